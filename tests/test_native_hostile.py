"""Hostile clients against a real fastetcd on the native transport: each leaves the server alive, serving
other clients, and within a memory bound (the server's RSS from /proc before and after).

- random bytes after a valid client preface;
- header blocks of several MB (HEADERS + CONTINUATION);
- a client that opens many calls with big answers (Ranges, busy watches) and never reads;
- slowloris: connections that trickle the preface byte by byte, or say nothing; the policy is grpc-go's
  connection timeout (``--handshake-timeout``): preface and SETTINGS (or an HTTP/1 request head) in time,
  or the connection is closed.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import hpack
import pytest
from h2_frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    SETTINGS,
    FrameClient,
    frame,
    grpc_headers,
    grpc_message,
    stateless_block,
)

from fastetcd.proto import rpc_pb2, rpc_pb2_grpc
from fastetcd.testing.process import ServerProcess, start_fastetcd
from fastetcd.testing.procfs import process_memory

MiB = 1024 * 1024
HANDSHAKE_TIMEOUT = 1.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_fastetcd(tmp_path, ["--transport", "native", "--store", "embedded",
                                     "--handshake-timeout", f"{HANDSHAKE_TIMEOUT}s"])
    try:
        yield proc
    finally:
        proc.kill()


def rss(server: ServerProcess) -> int:
    return process_memory(server.pid)


def open_fds(server: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{server.pid}/fd"))


def serves(server: ServerProcess, key: bytes = b"probe", timeout: float = 5.0) -> float:
    """Put and read back a key on a new connection; returns how long it took."""
    t0 = time.monotonic()
    with grpc.insecure_channel(server.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        kv.Put(rpc_pb2.PutRequest(key=key, value=b"ok"), timeout=timeout)
        assert kv.Range(rpc_pb2.RangeRequest(key=key), timeout=timeout).kvs[0].value == b"ok"
    return time.monotonic() - t0


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def read_to_eof(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (AssertionError if it does not)."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "the server did not close the connection"
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not data:
            return out
        out += data


def send_all(sock: socket.socket, data: bytes) -> bool:
    """sendall, False if the server closed the connection first."""
    try:
        sock.sendall(data)
    except OSError as e:
        if e.errno in (errno.EPIPE, errno.ECONNRESET):
            return False
        raise
    return True


def alive_and_settled(server: ServerProcess, fds: int, rss_before: int, rss_bound: int) -> None:
    assert server.alive(), server.log_tail()
    serves(server)
    wait_for(lambda: open_fds(server) <= fds, 10, "the server to close the hostile connections")
    grown = rss(server) - rss_before
    print(f"RSS grew by {grown / MiB:.1f} MiB")
    assert grown < rss_bound, f"RSS grew by {grown / MiB:.1f} MiB"


# ------------------------------------------------------------------------------------------ garbage


def test_random_bytes_after_the_preface(server: ServerProcess) -> None:
    serves(server)
    fds, before = open_fds(server), rss(server)
    rng = random.Random(8)
    for i in range(60):
        garbage = rng.randbytes(rng.randrange(1, 64 * 1024))
        # Half go right after the preface, half after a valid SETTINGS frame too.
        head = PREFACE + (frame(SETTINGS, 0, 0) if i % 2 else b"")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            if send_all(s, head + garbage):
                s.shutdown(socket.SHUT_WR)  # a frame cut short by the end is a wait, not an error
            read_to_eof(s, 5)
    alive_and_settled(server, fds, before, 20 * MiB)


# ------------------------------------------------------------------------------------------ header blocks


def header_block_attack(server: ServerProcess, fragments: Iterator[bytes]) -> bytes:
    """HEADERS then CONTINUATIONs with ``fragments`` (the last one ends the block); what the server sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        received = b""
        s.sendall(PREFACE + frame(SETTINGS, 0, 0))
        first = True
        pending = next(fragments)
        for nxt in fragments:
            if not send_all(s, frame(HEADERS if first else CONTINUATION, 0, 1, pending)):
                break
            first, pending = False, nxt
            # Keep the server's early answer (a GOAWAY) from being lost to a reset: read what is there.
            if select.select([s], [], [], 0)[0]:
                chunk = s.recv(65536)
                received += chunk
                if not chunk:
                    break
        else:
            send_all(s, frame(CONTINUATION, END_HEADERS, 1, pending))
        try:
            received += read_to_eof(s, 10)
        except AssertionError:
            received += b"<still open>"
        return received


def goaway_code(received: bytes) -> int | None:
    while len(received) >= 9:
        length, kind = int.from_bytes(received[:3], "big"), received[3]
        if kind == 7:
            return struct.unpack(">I", received[13:17])[0]
        received = received[9 + length:]
    return None


def test_header_block_of_megabytes(server: ServerProcess) -> None:
    serves(server)
    fds, before = open_fds(server), rss(server)
    encoder = hpack.Encoder()
    start = encoder.encode(grpc_headers("/etcdserverpb.KV/Range"))
    # 4 MiB of distinct 4 KiB headers (nothing for the HPACK table to reuse), in 16 KiB frames.
    fields = b"".join(encoder.encode([(f"x-pad-{i}", "a" * 4000)]) for i in range(1000))
    block = start + fields
    received = header_block_attack(server, iter([block[i:i + 16384] for i in range(0, len(block), 16384)]))
    assert b"<still open>" not in received, "the server kept the connection"
    assert goaway_code(received) is not None, received[:200]

    # One header field of 4 MiB (one literal, its length prefix first), in 16 KiB frames.
    field = b"\x00" + bytes(hpack.hpack.encode_integer(5, 7)) + b"x-big"
    value_len = bytes(hpack.hpack.encode_integer(4 * MiB, 7))
    block = start + field + value_len + b"b" * (4 * MiB)
    received = header_block_attack(server, iter([block[i:i + 16384] for i in range(0, len(block), 16384)]))
    assert b"<still open>" not in received, "the server kept the connection"
    alive_and_settled(server, fds, before, 20 * MiB)


# ------------------------------------------------------------------------------------------ never reading


def test_many_calls_never_read(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for i in range(32):
            value = bytes([65 + i % 26]) * (256 * 1024)
            kv.Put(rpc_pb2.PutRequest(key=b"big/%02d" % i, value=value), timeout=10)
        serves(server)
        fds, before = open_fds(server), rss(server)

        # Windows as large as HTTP/2 allows: flow control holds nothing back; only the server's own
        # bounds do. 100 Ranges of 8 MiB each and 100 watches of a busy prefix, and not one byte read.
        hostile = FrameClient(server.port, window=2**31 - 1)
        big_range = rpc_pb2.RangeRequest(key=b"big/", range_end=b"big0").SerializeToString()
        watch = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=b"ev/", range_end=b"ev0")).SerializeToString()
        watch_headers = stateless_block(grpc_headers("/etcdserverpb.Watch/Watch"))
        range_headers = stateless_block(grpc_headers("/etcdserverpb.KV/Range"))
        burst = b""
        for i in range(100):
            burst += frame(HEADERS, END_HEADERS, 4 * i + 1, range_headers)
            burst += frame(DATA, END_STREAM, 4 * i + 1, grpc_message(big_range))
            burst += frame(HEADERS, END_HEADERS, 4 * i + 3, watch_headers)
            burst += frame(DATA, 0, 4 * i + 3, grpc_message(watch))
        # In one write, so that the server reads all 200 calls at once: stopping reading once its writes
        # back up does not bound what it already read.
        hostile.sock.sendall(burst)

        # Meanwhile others write 16 MiB of events that all 100 watches want, and are served.
        slowest = 0.0
        for i in range(400):
            kv.Put(rpc_pb2.PutRequest(key=b"ev/%d" % (i % 50), value=b"e" * 40000), timeout=10)
            if i % 100 == 0:
                slowest = max(slowest, serves(server, b"probe%d" % i))
        time.sleep(1)
        peak = rss(server) - before
        print(f"RSS grew by {peak / MiB:.1f} MiB with the hostile client; slowest probe {slowest:.2f}s")
        assert server.alive(), server.log_tail()
        assert slowest < 3.0
        # Without the connection's output budget (32 MiB) the 100 Range answers alone are 800 MiB (measured:
        # 850 MiB); with it, about 60 MiB.
        assert peak < 120 * MiB, f"RSS grew by {peak / MiB:.1f} MiB"
        hostile.close()
        alive_and_settled(server, fds, before, 120 * MiB)


# ------------------------------------------------------------------------------------------ slowloris


def test_slowloris_connections_are_closed(server: ServerProcess) -> None:
    serves(server)
    fds, before = open_fds(server), rss(server)
    trickling = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(100)]
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(100)]
    http1 = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
    for s in http1:
        s.sendall(b"GET /health HTTP/1.1\r\n")  # and the rest of the head never comes
    closed: set[socket.socket] = set()
    stop = threading.Event()
    probes: list[float] = []

    def probe() -> None:
        while not stop.is_set():
            probes.append(serves(server, b"slowloris-probe"))
            time.sleep(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    t0 = time.monotonic()
    position = 0
    try:
        # One byte of the preface every 0.1 s on each trickling connection: 2.4 s for the whole preface,
        # longer than the handshake timeout.
        while len(closed) < len(trickling) + len(idle) + len(http1) and time.monotonic() - t0 < 8:
            for s in trickling:
                if s in closed or position >= len(PREFACE):
                    continue
                if not send_all(s, PREFACE[position:position + 1]):
                    closed.add(s)
            position += 1
            ready = select.select([s for s in trickling + idle + http1 if s not in closed], [], [], 0.1)[0]
            for s in ready:
                try:
                    if not s.recv(65536):
                        closed.add(s)
                except ConnectionResetError:
                    closed.add(s)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        prober.join(10)
        for s in trickling + idle + http1:
            s.close()
    total = len(trickling) + len(idle) + len(http1)
    assert len(closed) == total, f"{len(closed)} of {total} closed after {elapsed:.1f}s"
    assert elapsed < HANDSHAKE_TIMEOUT + 3
    assert probes and max(probes) < 2.0, probes
    alive_and_settled(server, fds, before, 20 * MiB)
