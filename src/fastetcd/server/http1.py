"""The HTTP/1.x side of the client port: ``/health`` and ``/version`` as etcd answers them, 404 otherwise.

etcd serves these on its client port beside gRPC (cmux); tools such as load balancers' health checks and
``curl`` rely on them. Responses are byte-for-byte etcd's bodies and status lines; the header set is
etcd's minus ``Date``. The native transport hands a connection here when its first bytes are not the
HTTP/2 preface; this parser is deliberately small (no chunked request bodies, no pipelining beyond
sequential requests), since nothing but probes talks HTTP/1 to an etcd client port.
"""

from __future__ import annotations

import json
import re

from fastetcd import ETCD_COMPAT_VERSION

# The cluster version etcd 3.5 reports (its minimum cluster version, "3.5.0").
CLUSTER_VERSION = "3.5.0"
MAX_HEAD_BYTES = 16 * 1024

_CORS = (
    b"Access-Control-Allow-Headers: accept, content-type, authorization\r\n"
    b"Access-Control-Allow-Methods: POST, GET, OPTIONS, PUT, DELETE\r\n"
    b"Access-Control-Allow-Origin: *\r\n"
)
_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.([01])\Z")

HEALTH_BODY = b'{"health":"true","reason":""}'
VERSION_BODY = json.dumps(
    {"etcdserver": ETCD_COMPAT_VERSION, "etcdcluster": CLUSTER_VERSION}, separators=(",", ":")
).encode()


def _response(
    status: bytes, content_type: bytes, body: bytes, extra: bytes = b"", close: bool = False
) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\n" + _CORS + extra
    head += b"Content-Type: " + content_type + b"\r\n"
    if close:
        head += b"Connection: close\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def respond(method: bytes, target: bytes, close: bool = False) -> bytes:
    """The whole response to one request (etcd 3.5's handlers: GET only, 405 with Allow otherwise)."""
    path = target.split(b"?", 1)[0]
    if path in (b"/health", b"/version"):
        if method != b"GET":
            return _response(
                b"405 Method Not Allowed",
                b"text/plain; charset=utf-8",
                b"Method Not Allowed\n",
                b"Allow: GET\r\nX-Content-Type-Options: nosniff\r\n",
                close,
            )
        if path == b"/health":
            return _response(b"200 OK", b"text/plain; charset=utf-8", HEALTH_BODY, close=close)
        return _response(b"200 OK", b"application/json", VERSION_BODY, close=close)
    return _response(
        b"404 Not Found",
        b"text/plain; charset=utf-8",
        b"404 page not found\n",
        b"X-Content-Type-Options: nosniff\r\n",
        close,
    )


BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
    b"400 Bad Request"
)


class Http1Session:
    """Sequential HTTP/1.x requests on one connection: feed bytes, get the bytes to answer with."""

    def __init__(self) -> None:
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
        return respond(method, target, close=not keep_alive)
