"""The native HTTP/2 + gRPC transport (fastetcd.server.native_transport) in-process, with toy routes.

The server runs on its own uvloop event loop in a thread; clients are grpcio (what etcd client libraries
speak) and, for what grpcio clients never send (unknown encodings, raw pings, a reader that stops), a
raw HTTP/2 client on the h2 package.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import uvloop
from google.protobuf.message import DecodeError

from fastetcd import ETCD_COMPAT_VERSION, errors
from fastetcd.server import http1 as http1_module
from fastetcd.server.grpc_transport import GRPC_OVERHEAD_BYTES
from fastetcd.server.native_transport import NativeServer

MAX_REQUEST_BYTES = 64 * 1024
LIMIT = MAX_REQUEST_BYTES + GRPC_OVERHEAD_BYTES
STREAM_BUFFER = 64 * 1024
FLOOD_MAX = 8192  # 128 MiB of 16 KiB messages
Send = Callable[[bytes], Awaitable[None]]


class Recorder:
    """What the handlers saw, readable from the test thread."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.finally_ran = threading.Event()
        self.started = threading.Event()
        self.sent = 0
        self.last_message_size = 0


class Routes:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def echo(self, raw: bytes) -> bytes:
        return raw

    def echo_sync(self, raw: bytes) -> bytes:
        return b"sync:" + raw

    async def fail(self, raw: bytes) -> bytes:
        raise errors.EMPTY_KEY

    def fail_sync(self, raw: bytes) -> bytes:
        raise errors.COMPACTED

    def echo_later(self, raw: bytes) -> asyncio.Future[bytes]:
        # A direct handler's write path: the answer comes from a future resolved on a later loop turn.
        fut = asyncio.get_running_loop().create_future()
        if raw == b"fail":
            fut.get_loop().call_soon(fut.set_exception, errors.TIMEOUT())
        else:
            fut.get_loop().call_soon(fut.set_result, b"later:" + raw)
        return fut

    def slow_later(self, raw: bytes) -> asyncio.Future[bytes]:
        # A direct handler whose answer takes a while (a write forwarded to the leader, say).
        return asyncio.ensure_future(self.slow(raw))

    async def decode(self, raw: bytes) -> bytes:
        raise DecodeError("Error parsing message")

    async def boom(self, raw: bytes) -> bytes:
        raise ValueError("boom")

    async def slow(self, raw: bytes) -> bytes:
        self.rec.started.set()
        try:
            await asyncio.sleep(float(raw or b"30"))
        except asyncio.CancelledError:
            self.rec.cancelled.set()
            raise
        finally:
            self.rec.finally_ran.set()
        return b"slept"

    async def bidi_echo(self, requests: AsyncIterator[bytes], send: Send) -> None:
        async for raw in requests:
            await send(raw)

    async def bidi_count(self, requests: AsyncIterator[bytes], send: Send) -> None:
        """First request "N SIZE": send N messages of SIZE bytes, then end OK."""
        first = await requests.__anext__()
        n, size = map(int, first.split())
        for i in range(n):
            await send(i.to_bytes(4, "big") + b"x" * max(size - 4, 0))

    async def bidi_hold(self, requests: AsyncIterator[bytes], send: Send) -> None:
        """Answer the first request, then wait forever (until cancelled)."""
        try:
            async for raw in requests:
                await send(raw)
                self.rec.started.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.rec.cancelled.set()
            raise
        finally:
            self.rec.finally_ran.set()

    async def bidi_flood(self, requests: AsyncIterator[bytes], send: Send) -> None:
        """Send 16 KiB messages as fast as send() allows, counting them (at most FLOOD_MAX, yielding now
        and then, so that a transport without backpressure fails the test instead of eating memory)."""
        self.rec.started.set()
        try:
            while self.rec.sent < FLOOD_MAX:
                await send(b"f" * 16384)
                self.rec.sent += 1
                if self.rec.sent % 256 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(3600)
        finally:
            self.rec.finally_ran.set()

    async def bidi_deaf(self, requests: AsyncIterator[bytes], send: Send) -> None:
        """Never reads its requests."""
        self.rec.started.set()
        await asyncio.sleep(3600)

    async def bidi_error(self, requests: AsyncIterator[bytes], send: Send) -> None:
        async for raw in requests:
            if raw == b"fail":
                raise errors.COMPACTED
            await send(raw)

    def table(self) -> dict[str, tuple[str, Callable[..., Any]]]:
        # A route table reads best as one line per route, even though the lines look alike.
        return {
            "/t.S/Echo": ("unary", self.echo),
            "/t.S/EchoSync": ("direct", self.echo_sync),
            "/t.S/EchoLater": ("direct", self.echo_later),
            "/t.S/SlowLater": ("direct", self.slow_later),
            "/t.S/Fail": ("unary", self.fail),
            "/t.S/FailSync": ("direct", self.fail_sync),
            "/t.S/Decode": ("unary", self.decode),
            "/t.S/Boom": ("unary", self.boom),
            "/t.S/Slow": ("unary", self.slow),
            "/t.S/BidiEcho": ("bidi", self.bidi_echo),
            "/t.S/BidiCount": ("bidi", self.bidi_count),
            "/t.S/BidiHold": ("bidi", self.bidi_hold),
            "/t.S/BidiFlood": ("bidi", self.bidi_flood),
            "/t.S/BidiError": ("bidi", self.bidi_error),
            "/t.S/BidiDeaf": ("bidi", self.bidi_deaf),
        }


class LoopThread:
    """A NativeServer on a uvloop event loop in a background thread."""

    def __init__(self, loop: str = "uvloop", **server_kw: Any) -> None:
        self.rec = Recorder()
        # uvloop is what fastetcd runs on; the stock loop is its fallback where uvloop is missing.
        self.loop = uvloop.new_event_loop() if loop == "uvloop" else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = NativeServer(Routes(self.rec).table(), max_request_bytes=MAX_REQUEST_BYTES,
                                   stream_buffer_bytes=STREAM_BUFFER, **server_kw)
        addrs = self.call(self.server.start("127.0.0.1", 0))
        self.port = addrs[0][1]
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any]) -> Any:
        async def inline() -> Any:
            return fn()

        return self.call(inline())

    def close(self) -> None:
        try:
            self.call(self.server.stop(0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def native(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    lt = LoopThread(request.param)
    try:
        yield lt
    finally:
        lt.close()


@pytest.fixture
def channel(native: LoopThread) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(native.target, options=[("grpc.max_send_message_length", -1),
                                                       ("grpc.max_receive_message_length", -1)])
    try:
        yield ch
    finally:
        ch.close()


def unary(ch: grpc.Channel, method: str, payload: bytes, **kw: Any) -> bytes:
    return ch.unary_unary(f"/t.S/{method}")(payload, timeout=kw.pop("timeout", 10), **kw)


def status(ch: grpc.Channel, method: str, payload: bytes = b"", **kw: Any) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as info:
        unary(ch, method, payload, **kw)
    return info.value.code().name, info.value.details()


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------ raw HTTP/2


def frame(msg: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(msg)) + msg


class RawH2:
    """A hand-driven HTTP/2 client: it reads only when asked to, so it can also stop reading."""

    def __init__(self, port: int, window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.conn.increment_flow_control_window(window - 65535)
        self.flush()
        self.events: list[Any] = []
        self.eof = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = (),
                end: bool = True, flush: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        hs = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
              ("content-type", "application/grpc"), ("te", "trailers"), *headers]
        self.conn.send_headers(sid, hs, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        if flush:
            self.flush()
        return sid

    def pump(self, timeout: float = 10.0) -> None:
        self.sock.settimeout(timeout)
        data = self.sock.recv(1 << 20)
        if not data:
            self.eof = True
            return
        for ev in self.conn.receive_data(data):
            self.events.append(ev)
            if isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.flush()

    def read_until(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred() and not self.eof:
            assert time.monotonic() < deadline, f"timed out; events so far: {self.events}"
            self.pump(max(deadline - time.monotonic(), 0.01))

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid
                   for e in self.events)

    def headers(self, sid: int) -> list[dict[bytes, bytes]]:
        self.read_until(lambda: self.ended(sid))
        return [dict(e.headers) for e in self.events
                if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived))
                and e.stream_id == sid]

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------------------ unary


def test_unary_echo_async_and_direct(channel: grpc.Channel) -> None:
    assert unary(channel, "Echo", b"hello") == b"hello"
    assert unary(channel, "Echo", b"") == b""
    assert unary(channel, "EchoSync", b"hi") == b"sync:hi"
    assert unary(channel, "EchoLater", b"hi") == b"later:hi"
    for i in range(200):  # many calls on one connection
        assert unary(channel, "Echo", b"%d" % i) == b"%d" % i


def test_errors_carry_code_and_message(channel: grpc.Channel) -> None:
    assert status(channel, "Fail") == ("INVALID_ARGUMENT", "etcdserver: key is not provided")
    assert status(channel, "FailSync") == ("OUT_OF_RANGE",
                                           "etcdserver: mvcc: required revision has been compacted")
    assert status(channel, "EchoLater", b"fail") == ("UNAVAILABLE", "etcdserver: request timed out")
    assert status(channel, "Decode") == ("INTERNAL",
                                         "grpc: error unmarshalling request: Error parsing message")
    assert status(channel, "Boom") == ("UNKNOWN", "Unexpected <class 'ValueError'>: boom")
    assert status(channel, "Nope") == ("UNIMPLEMENTED", "Method not found!")
    assert channel.unary_unary("/x.Y/Echo")  # a whole unknown service, too
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/x.Y/Echo")(b"", timeout=10)
    assert (info.value.code().name, info.value.details()) == ("UNIMPLEMENTED", "Method not found!")
    assert unary(channel, "Echo", b"still serving") == b"still serving"


def test_errors_are_trailers_only_and_percent_encoded(native: LoopThread) -> None:
    raw = RawH2(native.port)
    try:
        sid = raw.request("/t.S/Fail", frame(b""))
        blocks = raw.headers(sid)
        assert len(blocks) == 1, blocks  # a single HEADERS frame that ends the stream
        assert blocks[0][b":status"] == b"200"
        assert blocks[0][b"content-type"] == b"application/grpc"
        assert blocks[0][b"grpc-status"] == b"3"
        assert blocks[0][b"grpc-message"] == b"etcdserver: key is not provided"
        assert not any(isinstance(e, h2.events.DataReceived) for e in raw.events)

        sid = raw.request("/t.S/Boom", frame(b""))
        assert raw.headers(sid)[0][b"grpc-message"] == b"Unexpected <class 'ValueError'>: boom"

        sid = raw.request("/t.S/Echo", frame(b"ok"))
        head, trailers = raw.headers(sid)
        assert head[b":status"] == b"200" and b"grpc-status" not in head
        assert trailers[b"grpc-status"] == b"0"
        data = b"".join(e.data for e in raw.events if isinstance(e, h2.events.DataReceived)
                        and e.stream_id == sid)
        assert data == frame(b"ok")
    finally:
        raw.close()


def test_percent_encoding() -> None:
    from fastetcd.server._native import percent_encode

    assert percent_encode("plain text: ok") == b"plain text: ok"
    assert percent_encode("100% sure\n") == b"100%25 sure%0A"
    assert percent_encode("caf\u00e9") == b"caf%C3%A9"


def test_over_limit_message_is_resource_exhausted(channel: grpc.Channel) -> None:
    assert unary(channel, "Echo", b"x" * LIMIT) == b"x" * LIMIT  # exactly the limit is fine
    code, details = status(channel, "Echo", b"x" * (LIMIT + 1))
    assert code == "RESOURCE_EXHAUSTED"
    assert details == f"grpc: received message larger than max ({LIMIT + 1} vs. {LIMIT})"  # etcd's words
    assert unary(channel, "Echo", b"after") == b"after"


def test_large_message_split_across_frames(channel: grpc.Channel) -> None:
    # ~577 KiB: many DATA frames each way, several window updates.
    payload = bytes(range(256)) * (LIMIT // 256)
    assert unary(channel, "Echo", payload) == payload


def test_several_messages_in_one_frame_and_split_prefixes(native: LoopThread) -> None:
    raw = RawH2(native.port)
    try:
        # Three messages in one DATA frame, the third cut inside its length prefix and finished by a
        # second frame; the bidi echo answers each.
        body = frame(b"one") + frame(b"two") + frame(b"three")
        sid = raw.request("/t.S/BidiEcho", body[:-6], end=False)
        raw.conn.send_data(sid, body[-6:], end_stream=True)
        raw.flush()
        raw.headers(sid)
        data = b"".join(e.data for e in raw.events if isinstance(e, h2.events.DataReceived))
        assert data == body
    finally:
        raw.close()


def test_gzip_request(channel: grpc.Channel) -> None:
    payload = b"compress me " * 1000
    assert unary(channel, "Echo", payload, compression=grpc.Compression.Gzip) == payload
    # Over the limit once inflated: refused as grpc-go refuses an oversized message.
    code, details = status(channel, "Echo", b"\0" * (LIMIT + 10), compression=grpc.Compression.Gzip)
    assert code == "RESOURCE_EXHAUSTED"
    assert details.startswith("grpc: received message after decompression larger than max ("), details


def test_compression_edge_cases(native: LoopThread) -> None:
    raw = RawH2(native.port)
    try:
        sid = raw.request("/t.S/Echo", frame(gzip.compress(b"zipped"), True),
                          headers=(("grpc-encoding", "gzip"),))
        raw.headers(sid)
        assert b"".join(e.data for e in raw.events if isinstance(e, h2.events.DataReceived)
                        and e.stream_id == sid) == frame(b"zipped")
        sid = raw.request("/t.S/Echo", frame(zlib.compress(b"deflated"), True),
                          headers=(("grpc-encoding", "deflate"),))
        raw.headers(sid)
        assert b"".join(e.data for e in raw.events if isinstance(e, h2.events.DataReceived)
                        and e.stream_id == sid) == frame(b"deflated")
        sid = raw.request("/t.S/Echo", frame(b"not gzip", True), headers=(("grpc-encoding", "gzip"),))
        (only,) = raw.headers(sid)
        assert only[b"grpc-status"] == b"13"
        assert only[b"grpc-message"].startswith(b"grpc: failed to decompress the received message")
        sid = raw.request("/t.S/Echo", frame(b"a", True), headers=(("grpc-encoding", "br"),))
        (only,) = raw.headers(sid)
        assert only[b"grpc-status"] == b"12"  # UNIMPLEMENTED, as etcd (grpc-go) answers
        assert only[b"grpc-message"] == b'grpc: Decompressor is not installed for grpc-encoding "br"'
        sid = raw.request("/t.S/Echo", frame(b"a", True))
        (only,) = raw.headers(sid)
        assert (only[b"grpc-status"], only[b"grpc-message"]) == (
            b"13", b"Compression bit set but no encoding configured")
    finally:
        raw.close()


def test_deadline_exceeded(native: LoopThread, channel: grpc.Channel) -> None:
    # grpcio's client gives up by itself at the deadline; the server must also stop the handler.
    code, _ = status(channel, "Slow", b"30", timeout=0.3)
    assert code == "DEADLINE_EXCEEDED"
    assert native.rec.cancelled.wait(5)
    # A raw client that waits: the server answers DEADLINE_EXCEEDED itself.
    raw = RawH2(native.port)
    try:
        sid = raw.request("/t.S/Slow", frame(b"30"), headers=(("grpc-timeout", "200m"),))
        (only,) = raw.headers(sid)
        assert (only[b"grpc-status"], only[b"grpc-message"]) == (b"4", b"Deadline Exceeded")
        sid = raw.request("/t.S/Echo", frame(b"a"), headers=(("grpc-timeout", "soon"),))
        (only,) = raw.headers(sid)
        assert (only[b"grpc-status"], only[b"grpc-message"]) == (
            b"13", b"Error parsing 'grpc-timeout' metadata")
    finally:
        raw.close()


@pytest.mark.parametrize("ending", ["deadline", "cancel"])
def test_a_direct_handlers_answer_is_cancelled_with_its_call(
    native: LoopThread, channel: grpc.Channel, ending: str
) -> None:
    # Its future is the work done for this call: a forwarded write retrying at the next leader must stop
    # once nobody waits for the answer, or it commits long after the client saw its call fail.
    if ending == "deadline":
        code, _ = status(channel, "SlowLater", b"30", timeout=0.3)
        assert code == "DEADLINE_EXCEEDED"
    else:
        fut = channel.unary_unary("/t.S/SlowLater").future(b"30", timeout=30)
        assert native.rec.started.wait(5)
        fut.cancel()
    assert native.rec.cancelled.wait(5), "the handler's future was not cancelled"


def test_a_ping_is_answered_while_a_direct_call_waits(native: LoopThread) -> None:
    # While a direct call's answer is pending (a write being made durable), what a read produced goes out
    # one loop turn later, after the writer took the write; the PING ack must not wait for the answer.
    raw = RawH2(native.port)
    try:
        raw.conn.ping(b"pending!")
        sid = raw.request("/t.S/SlowLater", frame(b"30"))  # one write: the PING, then the call
        assert native.rec.started.wait(5)
        raw.read_until(lambda: acks(raw) == 1, timeout=5)
        assert not raw.ended(sid)
    finally:
        raw.close()
    assert native.rec.cancelled.wait(5)


def test_direct_answers_resolved_together_all_arrive(native: LoopThread) -> None:
    # Answers of one connection resolved in one loop turn are written together once the last is in.
    raw = RawH2(native.port)
    try:
        sids = [raw.request("/t.S/EchoLater", frame(b"%d" % i), flush=False) for i in range(5)]
        raw.flush()
        raw.read_until(lambda: all(raw.ended(sid) for sid in sids))
        for i, sid in enumerate(sids):
            data = b"".join(e.data for e in raw.events
                            if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
            assert data == frame(b"later:%d" % i)
            assert raw.headers(sid)[-1][b"grpc-status"] == b"0"
    finally:
        raw.close()


def test_unary_without_a_message(native: LoopThread) -> None:
    raw = RawH2(native.port)
    try:
        sid = raw.request("/t.S/Echo")
        (only,) = raw.headers(sid)
        assert only[b"grpc-status"] == b"13"
    finally:
        raw.close()


# ------------------------------------------------------------------------------------------ streams


def test_bidi_stream_thousands_of_messages(channel: grpc.Channel) -> None:
    call = channel.stream_stream("/t.S/BidiEcho")
    n = 5000
    got = list(call(iter([b"m%d" % i for i in range(n)]), timeout=60))
    assert got == [b"m%d" % i for i in range(n)]
    out = list(channel.stream_stream("/t.S/BidiCount")(iter([b"3000 300"]), timeout=60))
    assert len(out) == 3000 and [int.from_bytes(m[:4], "big") for m in out] == list(range(3000))
    assert all(len(m) == 300 for m in out)


def test_bidi_stream_megabytes_each_way(channel: grpc.Channel) -> None:
    # 16 MiB through one stream: far more than the receive window, which is only given back as the
    # handler takes requests.
    msgs = [i.to_bytes(4, "big") * 2048 for i in range(2048)]
    got = channel.stream_stream("/t.S/BidiEcho")(iter(msgs), timeout=60)
    assert all(a == b for a, b in zip(got, msgs, strict=True))


def test_unread_requests_hold_the_client_back(native: LoopThread) -> None:
    from fastetcd.server.native_transport import WINDOW_BYTES

    raw = RawH2(native.port)
    try:
        raw.read_until(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in raw.events))
        sid = raw.request("/t.S/BidiDeaf", end=False)
        assert native.rec.started.wait(5)
        msg = frame(b"r" * (16384 - 5))
        sent = 0
        while sent < 64 * 1024 * 1024:
            while raw.conn.local_flow_control_window(sid) >= len(msg):
                raw.conn.send_data(sid, msg)
                sent += len(msg)
            raw.flush()
            try:
                raw.pump(timeout=0.5)  # take the server's window updates, if any come
            except TimeoutError:
                break  # none: the client is held back
        queued = native.run(lambda: native.server.queued_request_bytes())
        assert sent <= WINDOW_BYTES + 2 * len(msg), sent
        assert WINDOW_BYTES - 2 * len(msg) <= queued <= sent, (queued, sent)
    finally:
        raw.close()


def test_bidi_error_after_messages(channel: grpc.Channel) -> None:
    call = channel.stream_stream("/t.S/BidiError")(iter([b"a", b"b", b"fail"]), timeout=10)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for m in call:
            got.append(m)
    assert got == [b"a", b"b"]
    assert (info.value.code().name, info.value.details()) == (
        "OUT_OF_RANGE", "etcdserver: mvcc: required revision has been compacted")


def test_client_cancel_reaches_the_stream_handler(native: LoopThread, channel: grpc.Channel) -> None:
    call = channel.stream_stream("/t.S/BidiHold")(iter([b"hello"]), timeout=30)
    assert next(call) == b"hello"
    assert native.rec.started.wait(5)
    call.cancel()
    assert native.rec.cancelled.wait(5), "the handler was not cancelled"
    assert native.rec.finally_ran.wait(5)
    wait_for(lambda: native.run(lambda: native.server.buffered_bytes()) == 0)


def test_half_closed_stream_keeps_sending(channel: grpc.Channel) -> None:
    # The request iterator ends at once; the responses still arrive (as Watch needs).
    out = list(channel.stream_stream("/t.S/BidiCount")(iter([b"50 10"]), timeout=10))
    assert len(out) == 50


def test_stalled_reader_does_not_grow_server_memory(native: LoopThread) -> None:
    # A client with huge flow-control windows that stops reading: only the socket buffers and the
    # transport's high-water mark stand between the handler and unbounded memory.
    raw = RawH2(native.port, window=2**31 - 1)
    try:
        raw.request("/t.S/BidiFlood", frame(b"go"), end=False)
        assert native.rec.started.wait(5)
        samples = []
        for _ in range(10):
            time.sleep(0.1)
            samples.append(native.run(lambda: (native.rec.sent, native.server.buffered_bytes(),
                                               native.server.write_buffer_bytes())))
        print("sent, buffered, write buffer:", samples)
        sent, buffered, write_buffer = samples[-1]
        assert sent == samples[-4][0], f"the handler kept sending: {samples}"  # it is blocked in send()
        assert buffered <= STREAM_BUFFER + 16384 + 5, samples
        assert write_buffer <= 1024 * 1024, samples
        assert sent < FLOOD_MAX // 2, samples  # what the kernel's socket buffers hold, not more
    finally:
        raw.close()
    assert native.rec.finally_ran.wait(5)
    wait_for(lambda: native.run(lambda: native.server.connection_count()) == 0)


def test_stream_window_bounds_pending_bytes(native: LoopThread) -> None:
    # With the default 64 KiB window and no reading, the stream's own buffer is what fills up.
    raw = RawH2(native.port)
    try:
        raw.request("/t.S/BidiFlood", frame(b"go"), end=False)
        assert native.rec.started.wait(5)
        wait_for(lambda: native.run(lambda: native.server.buffered_bytes()) >= STREAM_BUFFER)
        time.sleep(0.2)
        sent = native.rec.sent
        time.sleep(0.2)
        assert native.rec.sent == sent
        assert native.run(lambda: native.server.buffered_bytes()) <= STREAM_BUFFER + 16384 + 5
    finally:
        raw.close()


# ------------------------------------------------------------------------------------------ connection


def test_ping_flood_gets_goaway_too_many_pings(native: LoopThread) -> None:
    raw = RawH2(native.port)
    try:
        for i in range(5):
            raw.conn.ping(b"%08d" % i)
            raw.flush()
            time.sleep(0.01)
        raw.read_until(lambda: any(isinstance(e, h2.events.ConnectionTerminated) for e in raw.events))
        (goaway,) = [e for e in raw.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert goaway.additional_data == b"too_many_pings"
        acks = [e for e in raw.events if isinstance(e, h2.events.PingAckReceived)]
        assert len(acks) >= 1  # nghttp2 answers pings
        raw.read_until(lambda: raw.eof)
    finally:
        raw.close()


def acks(raw: RawH2) -> int:
    return sum(isinstance(e, h2.events.PingAckReceived) for e in raw.events)


def test_pings_spaced_by_data_are_fine(native: LoopThread) -> None:
    raw = RawH2(native.port)
    try:
        for i in range(6):
            sid = raw.request("/t.S/Echo", frame(b"%d" % i))
            raw.headers(sid)
            raw.conn.ping(b"%08d" % i)
            raw.flush()
            raw.read_until(lambda n=i + 1: acks(raw) >= n)
        assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in raw.events)
    finally:
        raw.close()


def goaway_events(raw: RawH2) -> list[h2.events.ConnectionTerminated]:
    return [e for e in raw.events if isinstance(e, h2.events.ConnectionTerminated)]


def ping_every(raw: RawH2, n: int, interval: float) -> None:
    """Send ``n`` pings ``interval`` apart, reading the answers in between."""
    for i in range(n):
        raw.conn.ping(b"%08d" % i)
        raw.flush()
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline and not raw.eof and not goaway_events(raw):
            try:
                raw.pump(max(deadline - time.monotonic(), 0.01))
            except TimeoutError:
                break


def test_pings_without_a_stream_are_strikes() -> None:
    # grpc-go with PermitWithoutStream false (etcd's setting): with no stream open, a client has no
    # business pinging more often than every two hours, however far apart its pings are. The first
    # ping is free; the next three are strikes, and the third strike earns the GOAWAY.
    lt = LoopThread(min_ping_interval=0.05)
    raw = RawH2(lt.port)
    try:
        ping_every(raw, 3, 0.2)
        assert not goaway_events(raw) and acks(raw) == 3
        ping_every(raw, 1, 0.2)
        raw.read_until(lambda: bool(goaway_events(raw)))
        (goaway,) = goaway_events(raw)
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert goaway.additional_data == b"too_many_pings"
        raw.read_until(lambda: raw.eof)
    finally:
        raw.close()
        lt.close()


def test_pings_with_an_open_stream_follow_min_time() -> None:
    # With a stream open, pings min_ping_interval apart are fine; closer ones are strikes.
    lt = LoopThread(min_ping_interval=0.1)
    raw = RawH2(lt.port)
    try:
        raw.request("/t.S/BidiHold", frame(b"x"), end=False)
        raw.read_until(lambda: any(isinstance(e, h2.events.DataReceived) for e in raw.events))
        ping_every(raw, 6, 0.15)  # the response's HEADERS and DATA reset the count once; then nothing is sent
        assert not goaway_events(raw) and acks(raw) == 6
        ping_every(raw, 4, 0.01)
        raw.read_until(lambda: bool(goaway_events(raw)))
        assert goaway_events(raw)[0].additional_data == b"too_many_pings"
    finally:
        raw.close()
        lt.close()


def test_permit_without_stream_allows_spaced_pings() -> None:
    lt = LoopThread(min_ping_interval=0.05, permit_without_stream=True)
    raw = RawH2(lt.port)
    try:
        ping_every(raw, 6, 0.1)
        assert not goaway_events(raw) and acks(raw) == 6
    finally:
        raw.close()
        lt.close()


def test_max_concurrent_streams_is_advertised() -> None:
    lt = LoopThread(max_concurrent_streams=7)
    raw = RawH2(lt.port)
    try:
        raw.read_until(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in raw.events))
        assert raw.conn.remote_settings.max_concurrent_streams == 7
    finally:
        raw.close()
        lt.close()


def test_graceful_stop_finishes_in_flight_call(native: LoopThread, channel: grpc.Channel) -> None:
    result: Future[bytes] = unary_future(channel, "Slow", b"0.5")
    assert native.rec.started.wait(5)
    t0 = time.monotonic()
    native.call(native.server.stop(5))
    assert result.result(5) == b"slept"
    assert time.monotonic() - t0 < 3
    # No longer listening.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", native.port), timeout=2).close()


def test_stop_after_grace_cancels_what_still_runs(native: LoopThread, channel: grpc.Channel) -> None:
    call = channel.stream_stream("/t.S/BidiHold")(iter([b"x"]), timeout=30)
    assert next(call) == b"x"
    t0 = time.monotonic()
    native.call(native.server.stop(0.3))
    assert time.monotonic() - t0 < 2
    assert native.rec.cancelled.wait(5)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def unary_future(ch: grpc.Channel, method: str, payload: bytes) -> Future[bytes]:
    fut: Future[bytes] = Future()

    def run() -> None:
        try:
            fut.set_result(unary(ch, method, payload))
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return fut


# ------------------------------------------------------------------------------------------ HTTP/1


def http1(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_http1_health_and_version(native: LoopThread) -> None:
    resp = http1(native.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = resp.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b'{"health":"true","reason":""}'
    resp = http1(native.port, b"GET /version HTTP/1.0\r\n\r\n")
    head, body = resp.split(b"\r\n\r\n", 1)
    assert b"Content-Type: application/json" in head
    assert body == b'{"etcdserver":"%s","etcdcluster":"3.5.0"}' % ETCD_COMPAT_VERSION.encode()
    resp = http1(native.port, b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 404 Not Found\r\n") and resp.endswith(b"\r\n\r\n404 page not found\n")
    resp = http1(native.port, b"POST /health HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
    assert resp.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")


def test_plain_http2_requests_get_the_http_answers(native: LoopThread) -> None:
    # No gRPC content-type: answered as etcd's HTTP mux answers HTTP/2 (over TLS there), with a body.
    raw = RawH2(native.port)
    try:
        answers = {}
        for method, path in (("GET", "/health"), ("GET", "/"), ("HEAD", "/version"), ("POST", "/health")):
            sid = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(sid, [(":method", method), (":scheme", "http"), (":path", path),
                                        (":authority", "x")], end_stream=True)
            raw.flush()
            (head,) = raw.headers(sid)
            body = b"".join(e.data for e in raw.events if isinstance(e, h2.events.DataReceived)
                            and e.stream_id == sid)
            answers[method, path] = (head[b":status"], head[b"content-type"], body)
        assert answers["GET", "/health"] == (b"200", b"text/plain; charset=utf-8",
                                             b'{"health":"true","reason":""}')
        assert answers["GET", "/"] == (b"404", b"text/plain; charset=utf-8", b"404 page not found\n")
        assert answers["HEAD", "/version"][:2] == (b"200", b"application/json")
        assert answers["HEAD", "/version"][2] == b""
        assert answers["POST", "/health"][0] == b"405"
        assert unary_on(raw, "/t.S/Echo", b"grpc still") == b"grpc still"  # gRPC on the same connection
    finally:
        raw.close()


def unary_on(raw: RawH2, path: str, payload: bytes) -> bytes:
    sid = raw.request(path, frame(payload))
    raw.headers(sid)
    return b"".join(e.data for e in raw.events
                    if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)[5:]


def test_http1_keep_alive_serves_several_requests(native: LoopThread) -> None:
    with socket.create_connection(("127.0.0.1", native.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert first.endswith(b'{"health":"true","reason":""}')
        s.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = b""
        while data := s.recv(65536):
            rest += data
        assert rest.startswith(b"HTTP/1.1 200 OK") and b'"etcdserver"' in rest


def frame_types(data: bytes) -> list[int]:
    types = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        types.append(data[3])
        data = data[9 + length:]
    return types


@pytest.mark.parametrize("garbage", [b"\x00" * 100, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                                     b"hello there\r\n", b"GET\r\n\r\n",
                                     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64])
def test_garbage_closes_the_connection(native: LoopThread, channel: grpc.Channel, garbage: bytes) -> None:
    resp = http1(native.port, garbage)  # returns once the server closed the connection
    if garbage.startswith(b"PRI"):
        assert 7 in frame_types(resp)  # HTTP/2 garbage: a GOAWAY, then the close
    else:
        assert resp in (b"", http1_module.BAD_REQUEST)
    wait_for(lambda: native.run(lambda: native.server.connection_count()) <= 1)  # only the channel's
    assert unary(channel, "Echo", b"alive") == b"alive"


# ------------------------------------------------------------------------------------------ real services


class EtcdOnNative:
    """fastetcd's real KV and Watch services (embedded store) behind a NativeServer, in-process."""

    def __init__(self, lt: LoopThread, data_dir: str) -> None:
        from fastetcd.engine.state_machine import StateMachine
        from fastetcd.server.header import Header
        from fastetcd.server.kv import KVService
        from fastetcd.server.watch import WatchService
        from fastetcd.store.embedded import EmbeddedStore

        self.lt = lt

        async def start() -> None:
            self.store = EmbeddedStore(data_dir)
            self.sm = StateMachine(self.store, snapshot_count=100_000)
            await self.sm.start()
            self.hub = self.sm.watch_hub
            header = Header(cluster_id=1, member_id=2)
            self.kv = KVService(self.sm, header, max_request_bytes=MAX_REQUEST_BYTES, max_txn_ops=128)
            self.watch = WatchService(self.sm, header, max_request_bytes=MAX_REQUEST_BYTES,
                                      progress_interval=0)
            self.server = NativeServer({"/etcdserverpb.KV/Put": ("direct", self.kv.put),
                                        "/etcdserverpb.Watch/Watch": ("bidi", self.watch.watch)},
                                       max_request_bytes=MAX_REQUEST_BYTES)
            self.port = (await self.server.start("127.0.0.1", 0))[0][1]

        lt.call(start())

    def close(self) -> None:
        async def stop() -> None:
            await self.server.stop(0.5)
            await self.sm.stop()
            await self.store.close()

        self.lt.call(stop())


def test_cancelled_watch_streams_are_cleaned_up(native: LoopThread, tmp_path: Any) -> None:
    from fastetcd.proto import rpc_pb2, rpc_pb2_grpc

    etcd = EtcdOnNative(native, str(tmp_path / "data"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{etcd.port}") as ch:
            watch = rpc_pb2_grpc.WatchStub(ch)
            kv = rpc_pb2_grpc.KVStub(ch)
            calls = []
            for i in range(20):
                create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                    key=b"w/%d" % i, range_end=b"w/%d\xff" % i))
                call = watch.Watch(iter([create]), timeout=30)
                assert next(call).created
                calls.append(call)
            assert native.run(lambda: len(etcd.watch.streams)) == 20
            kv.Put(rpc_pb2.PutRequest(key=b"w/3", value=b"v"), timeout=10)
            (event,) = next(calls[3]).events
            assert (event.kv.key, event.kv.value) == (b"w/3", b"v")
            for call in calls:
                call.cancel()
            # The service's finally ran for every stream: it left the service and the hub.
            wait_for(lambda: native.run(lambda: (len(etcd.watch.streams), len(etcd.hub._sinks))) == (0, 0))
            assert native.run(lambda: etcd.server.buffered_bytes()) == 0
    finally:
        etcd.close()


def test_rpc_metrics_count_calls_as_grpcio_does(native: LoopThread, channel: grpc.Channel) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str, method: str, code: str | None = None, kind: str = "unary") -> float:
        labels = {"grpc_type": kind, "grpc_service": "t.S", "grpc_method": method}
        if code is not None:
            labels["grpc_code"] = code
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (sample("grpc_server_started_total", "Echo"), sample("grpc_server_handled_total", "Echo", "OK"),
              sample("grpc_server_handled_total", "Fail", "InvalidArgument"),
              sample("grpc_server_handled_total", "BidiHold", "Canceled", "bidi_stream"),
              REGISTRY.get_sample_value("etcd_network_client_grpc_received_bytes_total") or 0.0)
    for _ in range(3):
        unary(channel, "Echo", b"12345")
    status(channel, "Fail")
    call = channel.stream_stream("/t.S/BidiHold")(iter([b"x"]), timeout=30)
    assert next(call) == b"x"
    call.cancel()
    assert native.rec.finally_ran.wait(5)
    after = (sample("grpc_server_started_total", "Echo"), sample("grpc_server_handled_total", "Echo", "OK"),
             sample("grpc_server_handled_total", "Fail", "InvalidArgument"),
             sample("grpc_server_handled_total", "BidiHold", "Canceled", "bidi_stream"),
             REGISTRY.get_sample_value("etcd_network_client_grpc_received_bytes_total") or 0.0)
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3, 1, 1, 3 * 5 + 0 + 1]


def test_http1_answers_come_from_the_responder() -> None:
    seen = []

    def respond(method: str, target: str) -> tuple[int, str, bytes]:
        seen.append((method, target))
        if target == "/boom":
            raise RuntimeError("responder failed")
        return 503, "application/json", b'{"health":"false","reason":"ALARM NOSPACE"}'

    lt = LoopThread(http_respond=respond)
    try:
        resp = http1(lt.port, b"GET /health?exclude=NOSPACE HTTP/1.1\r\nConnection: close\r\n\r\n")
        head, body = resp.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert body == b'{"health":"false","reason":"ALARM NOSPACE"}'
        resp = http1(lt.port, b"HEAD /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert resp.endswith(b"Content-Length: 43\r\n\r\n")  # HEAD: headers only
        resp = http1(lt.port, b"GET /boom HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert seen == [("GET", "/health?exclude=NOSPACE"), ("HEAD", "/health"), ("GET", "/boom")]
    finally:
        lt.close()
