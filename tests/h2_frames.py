"""A raw HTTP/2 client that writes frames as given and keeps going where the h2 package would stop (after a
GOAWAY it refuses to read on; it will not send malformed or oversized frames): for tests of hostile clients
and of a server's shutdown.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
SETTINGS_INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, sid) + payload


def grpc_message(msg: bytes) -> bytes:
    return struct.pack(">BI", 0, len(msg)) + msg


def grpc_headers(path: str) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
            ("content-type", "application/grpc"), ("te", "trailers")]


def stateless_block(headers: list[tuple[str, str]]) -> bytes:
    """A header block that leaves the HPACK table alone: it may be sent any number of times, in any order."""
    return hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in headers])


class FrameClient:
    """Answers the server's PINGs and SETTINGS and gives back flow-control windows for what it reads, but
    only while it reads (``read_until``); between reads it is a client that does not read."""

    def __init__(self, port: int, window: int | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.eof = False
        self.data: dict[int, bytes] = {}
        self.headers: dict[int, list[dict[str, str]]] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaways: list[tuple[int, int, bytes]] = []  # (last stream id, error code, debug data)
        settings = b"" if window is None else struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
        if window is not None and window > 65535:
            self.sock.sendall(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", window - 65535)))

    def send(self, kind: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.sock.sendall(frame(kind, flags, sid, payload))

    def request(self, sid: int, path: str, message: bytes) -> None:
        """A gRPC call with one request message, half-closed."""
        self.send(HEADERS, END_HEADERS, sid, self.encoder.encode(grpc_headers(path)))
        self.send(DATA, END_STREAM, sid, grpc_message(message))

    def _read_frame(self) -> tuple[int, int, int, bytes] | None:
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                return None
            self.buf += chunk
        length = int.from_bytes(self.buf[:3], "big")
        kind, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        payload, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
        return kind, flags, sid, payload

    def _handle(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == DATA:
            self.data[sid] = self.data.get(sid, b"") + payload
            if payload:
                more = struct.pack(">I", len(payload))
                self.sock.sendall(frame(WINDOW_UPDATE, 0, 0, more) + frame(WINDOW_UPDATE, 0, sid, more))
        elif kind == HEADERS:  # servers send no CONTINUATION for headers this small
            self.headers.setdefault(sid, []).append(dict(self.decoder.decode(payload)))
        elif kind == PING and not flags & ACK:
            self.send(PING, ACK, 0, payload)
        elif kind == SETTINGS and not flags & ACK:
            self.send(SETTINGS, ACK, 0)
        elif kind == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.goaways.append((last & 0x7FFFFFFF, code, payload[8:]))
        elif kind == RST_STREAM:
            self.resets[sid] = struct.unpack(">I", payload)[0]
        if kind in (DATA, HEADERS) and flags & END_STREAM:
            self.ended.add(sid)

    def read_until(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.eof:
                raise AssertionError("the server closed the connection")
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; goaways {self.goaways}, ended {self.ended}"
            self.sock.settimeout(remaining)
            f = self._read_frame()
            if f is not None:
                self._handle(*f)

    def read_to_eof(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.eof:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "timed out waiting for the server to close the connection"
            self.sock.settimeout(remaining)
            f = self._read_frame()
            if f is not None:
                self._handle(*f)

    def close(self) -> None:
        self.sock.close()
