"""The HTTP/1.x side of the client port, as etcd's: ``/health``, ``/version`` (and whatever the responder
serves), answered on the same port as gRPC.

etcd serves these on its client port beside gRPC (cmux); load balancers' health checks and ``curl`` rely
on them. The native transport hands a connection here when its first bytes are not the HTTP/2 preface.
What to answer comes from a responder ``(method, target) -> (status, content type, body)`` — in the
server, ``HttpEndpoints.respond`` (alarms in /health, /metrics, ...); by default a static one that knows
/health and /version. This module only frames the answers, with etcd's headers minus ``Date``. The parser
is deliberately small (sequential requests, bodies skipped by Content-Length, no chunked bodies), since
nothing but probes talks HTTP/1 to an etcd client port.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from fastetcd import ETCD_CLUSTER_VERSION, ETCD_COMPAT_VERSION

MAX_HEAD_BYTES = 16 * 1024

Response = tuple[int, str, bytes]  # status, content type, body
Responder = Callable[[str, str], Response]

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
HEALTH_BODY = b'{"health":"true","reason":""}'
VERSION_BODY = json.dumps(
    {"etcdserver": ETCD_COMPAT_VERSION, "etcdcluster": ETCD_CLUSTER_VERSION}, separators=(",", ":")
).encode()

_CORS = (
    b"Access-Control-Allow-Headers: accept, content-type, authorization\r\n"
    b"Access-Control-Allow-Methods: POST, GET, OPTIONS, PUT, DELETE\r\n"
    b"Access-Control-Allow-Origin: *\r\n"
)
_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 500: b"Internal Server Error",
            503: b"Service Unavailable"}
_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.([01])\Z")

BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
    b"400 Bad Request"
)


def static_respond(method: str, target: str) -> Response:
    """/health (always healthy) and /version without an engine behind them; 404 for anything else."""
    path = target.split("?", 1)[0]
    if path not in ("/health", "/version"):
        return 404, TEXT, b"404 page not found\n"
    if method not in ("GET", "HEAD"):
        return 405, TEXT, b"Method Not Allowed\n"
    return (200, TEXT, HEALTH_BODY) if path == "/health" else (200, JSON, VERSION_BODY)


def frame(method: str, response: Response, close: bool) -> bytes:
    """One HTTP/1.1 response as etcd (Go's net/http) writes it, minus Date."""
    status, content_type, body = response
    head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status"))
    head += _CORS
    if status == 405:
        head += b"Allow: GET\r\n"
    if content_type.startswith("text/plain") and status >= 400:
        head += b"X-Content-Type-Options: nosniff\r\n"
    head += b"Content-Type: " + content_type.encode() + b"\r\n"
    if close:
        head += b"Connection: close\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    return head if method == "HEAD" else head + body


class Http1Session:
    """Sequential HTTP/1.x requests on one connection: feed bytes, get the bytes to answer with."""

    def __init__(self, respond: Responder = static_respond) -> None:
        self._respond = respond
        self._buf = bytearray()
        self._skip = 0  # request body bytes still to discard
        self.closed = False  # set once the connection must be closed after writing the answer

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; returns the responses it completes (possibly b"")."""
        out = bytearray()
        self._buf += data
        while not self.closed:
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
                if self._skip:
                    break
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    out += BAD_REQUEST
                    self.closed = True
                break
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            out += self._one(head)
        return bytes(out)

    def _one(self, head: bytes) -> bytes:
        lines = head.split(b"\r\n")
        m = _REQUEST_LINE.match(lines[0])
        if m is None:
            self.closed = True
            return BAD_REQUEST
        method, target, minor = m.groups()
        keep_alive = minor == b"1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                self.closed = True
                return BAD_REQUEST
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"connection":
                keep_alive = value != b"close" if minor == b"1" else value == b"keep-alive"
            elif name == b"content-length":
                if not value.isdigit():
                    self.closed = True
                    return BAD_REQUEST
                self._skip = int(value)
            elif name == b"transfer-encoding":
                keep_alive = False  # a chunked body is not parsed: answer, then close
        if not keep_alive:
            self.closed = True
        method_s = method.decode("latin-1")
        try:
            response = self._respond(method_s, target.decode("latin-1"))
        except Exception:
            response = (500, TEXT, b"Internal Server Error\n")
        return frame(method_s, response, close=not keep_alive)


def is_request_line(line: bytes) -> bool:
    """Whether ``line`` (the first line a client sent, CR included or not) is an HTTP/1.x request line."""
    return _REQUEST_LINE.match(line.rstrip(b"\r")) is not None
