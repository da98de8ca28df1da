# cython: language_level=3
"""HTTP/2 + gRPC server connections on libnghttp2, driven by an asyncio Protocol (works under uvloop).

One ``Connection`` per accepted socket owns one server-side ``nghttp2_session``. Bytes read from the
socket go through ``nghttp2_session_mem_recv``; the callbacks below assemble gRPC requests (5-byte
length-prefixed messages, split across DATA frames or several to a frame), route them by ``:path`` and
run the transport-neutral services. Frames to send are pulled with ``nghttp2_session_mem_send`` and
written to the transport in batches.

Outgoing message bytes wait in a per-stream queue that nghttp2's data provider pulls only as the peer's
flow-control window allows; a bidi handler's ``send()`` waits while its stream has more than
``stream_buffer_bytes`` queued, and the connection stops pulling (and stops reading) while the socket's
write buffer is above its high-water mark. So a client that does not read costs a bounded amount of
memory: nothing grows without the peer's consent.

Errors follow grpcio's transport (fastetcd's reference): the same status codes and texts.
"""

from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from fastetcd.server._nghttp2 cimport *

import asyncio
import collections
import logging
import time
import zlib

from google.protobuf.message import DecodeError

from fastetcd import errors, metrics
from fastetcd.metrics import RpcMetrics
from fastetcd.server import http1
from fastetcd.server.call_context import ANONYMOUS, ANONYMOUS_REQUIRING_LEADER, CALLER, Caller

log = logging.getLogger("fastetcd.server.native")

# ------------------------------------------------------------------------------------------ constants

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

GRPC_CANCELLED = 1
STATUS_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13,
    "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
CODE_NAMES = {number: name for name, number in STATUS_CODES.items()}
cdef object RECEIVED_BYTES = metrics.GRPC_RECEIVED
cdef object SENT_BYTES = metrics.GRPC_SENT

cdef enum:
    GRPC_OK = 0
    GRPC_UNKNOWN = 2
    GRPC_DEADLINE_EXCEEDED = 4
    GRPC_RESOURCE_EXHAUSTED = 8
    GRPC_UNIMPLEMENTED = 12
    GRPC_INTERNAL = 13
    GRPC_UNAVAILABLE = 14

# grpcio's own texts, so that both transports answer the same malformed call the same way.
MSG_METHOD_NOT_FOUND = "Method not found!"
MSG_DEADLINE = "Deadline Exceeded"
MSG_BAD_TIMEOUT = "Error parsing 'grpc-timeout' metadata"
MSG_COMPRESSED_NO_ENCODING = "Compression bit set but no encoding configured"
MSG_NO_REQUEST = "Missing request message"  # grpcio never answers a unary call without a message

# Route kinds. "direct" handlers answer without a coroutine: a plain function called inside
# data_received, returning the response bytes or a future of them (answered from its done callback).
cdef enum:
    KIND_UNARY = 1
    KIND_BIDI = 2
    KIND_DIRECT = 3
_KINDS = {"unary": KIND_UNARY, "bidi": KIND_BIDI, "direct": KIND_DIRECT}

# Stream states of the request side.
cdef enum:
    REQ_HEADERS = 0    # receiving request headers
    REQ_BODY = 1       # receiving messages
    REQ_DONE = 2       # the client half-closed
    REQ_IGNORED = 3    # answered already (an error): further request bytes are dropped

cdef enum:
    WRITE_CHUNK = 65536
    MAX_PING_STRIKES = 2  # grpc-go's maxPingStrikes: the third early ping earns a GOAWAY
    # The longest HTTP/1 request line we wait for before deciding what a connection speaks.
    MAX_REQUEST_LINE = 8192

# How long a closing connection waits for the client to close its side (see close_lingering).
LINGER_SECONDS = 1.0

# grpc-go's defaultPingTimeout: with no stream open (and PermitWithoutStream false, as etcd sets it), a
# client has no reason to ping more often than this.
PING_WITHOUT_STREAM_INTERVAL = 2 * 3600.0
# MAX_CONCURRENT_STREAMS meaning "no limit" (etcd's default, math.MaxUint32): nothing is advertised.
UNLIMITED_STREAMS = 0xFFFFFFFF
# The opaque data of the ping that follows the shutdown notice (grpc-go's goAwayPing).
cdef bytes DRAIN_PING = bytes([1, 6, 1, 8, 0, 3, 3, 9])

cdef bytes H_STATUS = b":status"
cdef bytes H_200 = b"200"
cdef bytes H_CONTENT_TYPE = b"content-type"
cdef bytes H_GRPC = b"application/grpc"
cdef bytes H_ACCEPT_ENCODING = b"grpc-accept-encoding"
cdef bytes H_ENCODINGS = b"identity, deflate, gzip"
cdef bytes H_GRPC_STATUS = b"grpc-status"
cdef bytes H_GRPC_MESSAGE = b"grpc-message"
cdef list RESPONSE_HEADERS = [(H_STATUS, H_200), (H_CONTENT_TYPE, H_GRPC), (H_ACCEPT_ENCODING, H_ENCODINGS)]
cdef list OK_TRAILERS = [(H_GRPC_STATUS, b"0")]
cdef bytes H_CONTENT_LENGTH = b"content-length"

_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6,
                  ord("n"): 1e-9}


def percent_encode(str message):
    """grpc-message encoding (gRPC's HTTP/2 spec): UTF-8, then %XX for bytes outside 0x20-0x7E and '%'."""
    cdef bytes raw = message.encode("utf-8", "replace")
    cdef bytearray out
    cdef unsigned char c
    for c in raw:
        if c < 0x20 or c > 0x7E or c == 0x25:
            break
    else:
        return raw
    out = bytearray()
    for c in raw:
        if c < 0x20 or c > 0x7E or c == 0x25:
            out += b"%%%02X" % c
        else:
            out.append(c)
    return bytes(out)


def parse_timeout(bytes value):
    """Seconds from a grpc-timeout value ("100m", "5S"), or None when it is malformed."""
    cdef Py_ssize_t n = len(value)
    if not 2 <= n <= 9 or not value[:n - 1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[n - 1])
    if unit is None:
        return None
    return int(value[:n - 1]) * unit


cdef tuple status_for(BaseException exc):
    """(grpc status code, message) for an exception a service raised, as grpc_transport.py maps them."""
    if isinstance(exc, errors.EtcdError):
        return STATUS_CODES.get(exc.code, GRPC_UNKNOWN), exc.message
    if isinstance(exc, DecodeError):
        return GRPC_INTERNAL, f"grpc: error unmarshalling request: {exc}"
    log.error("unexpected error in a gRPC handler", exc_info=exc)
    return GRPC_UNKNOWN, f"Unexpected {type(exc)}: {exc}"


cdef list status_trailers(int code, str message):
    if code == GRPC_OK and not message:
        return OK_TRAILERS
    cdef list t = [(H_GRPC_STATUS, str(code).encode())]
    if message:
        t.append((H_GRPC_MESSAGE, percent_encode(message)))
    return t


cdef nghttp2_nv *make_nva(list headers) except NULL:
    """A C array over ``headers`` (a list of (bytes, bytes)); valid while the list lives. Free it."""
    cdef size_t n = len(headers)
    cdef nghttp2_nv *nva = <nghttp2_nv *>malloc(sizeof(nghttp2_nv) * (n if n else 1))
    if nva == NULL:
        raise MemoryError()
    cdef size_t i = 0
    cdef bytes name, value
    for name, value in headers:
        nva[i].name = <uint8_t *>PyBytes_AS_STRING(name)
        nva[i].namelen = PyBytes_GET_SIZE(name)
        nva[i].value = <uint8_t *>PyBytes_AS_STRING(value)
        nva[i].valuelen = PyBytes_GET_SIZE(value)
        nva[i].flags = NGHTTP2_NV_FLAG_NONE
        i += 1
    return nva


class StreamClosed(ConnectionError):
    """The client reset the stream or the connection went away: nothing more can be sent on it."""


# ------------------------------------------------------------------------------------------ config


cdef class ServerConfig:
    """What every connection of one NativeServer shares: routes, limits, and the live connections."""

    cdef dict routes  # bytes path -> (int kind, handler, RpcMetrics)
    cdef readonly Py_ssize_t max_message_bytes
    cdef readonly Py_ssize_t stream_buffer_bytes
    cdef readonly uint32_t max_concurrent_streams
    cdef readonly int32_t window_bytes
    cdef readonly double min_ping_interval
    cdef readonly bint permit_without_stream
    cdef readonly double handshake_timeout
    cdef readonly Py_ssize_t connection_buffer_bytes
    cdef readonly set connections
    cdef object http_respond  # HTTP responder: (method, target) -> (status, content type, body)
    cdef nghttp2_option *option

    def __init__(self, dict routes, Py_ssize_t max_message_bytes, Py_ssize_t stream_buffer_bytes,
                 uint32_t max_concurrent_streams, int32_t window_bytes, double min_ping_interval,
                 http_respond=None, bint permit_without_stream=False, double handshake_timeout=20.0,
                 Py_ssize_t connection_buffer_bytes=32 * 1024 * 1024):
        self.routes = {}
        for path, (kind, fn) in routes.items():
            if kind not in _KINDS:
                raise ValueError(f"route {path}: unknown kind {kind!r} (use {', '.join(_KINDS)})")
            name = path.decode() if isinstance(path, bytes) else path
            rpc = RpcMetrics("bidi_stream" if kind == "bidi" else "unary", name)
            self.routes[name.encode()] = (_KINDS[kind], fn, rpc)
        self.max_message_bytes = max_message_bytes
        self.stream_buffer_bytes = stream_buffer_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.window_bytes = window_bytes
        self.min_ping_interval = min_ping_interval
        self.permit_without_stream = permit_without_stream
        self.handshake_timeout = handshake_timeout
        self.connection_buffer_bytes = connection_buffer_bytes
        self.connections = set()
        self.http_respond = http_respond if http_respond is not None else http1.static_respond
        # nghttp2 keeps up to MAX_CONCURRENT_STREAMS closed streams per connection, which is how it
        # recognizes frames on a closed stream (a STREAM_CLOSED error; without them it ignores such
        # frames). With no limit that would be a closed stream kept for every call the connection ever
        # made, so only a bounded limit keeps them.
        self.option = OPTION if max_concurrent_streams != UNLIMITED_STREAMS else OPTION_NO_CLOSED


# ------------------------------------------------------------------------------------------ requests


cdef class RequestIterator:
    """A bidi stream's request messages as an async iterator; ends when the client half-closes.

    Each message's bytes count against the stream's HTTP/2 receive window until the handler takes it,
    so a client cannot queue more than a window's worth of requests that the handler does not read.
    """

    cdef object items
    cdef object sizes  # wire bytes of each queued message (with its 5-byte prefix)
    cdef object waiter
    cdef object loop
    cdef bint ended
    cdef object error
    cdef Stream stream  # None once the stream is closed
    cdef readonly Py_ssize_t queued_bytes

    def __cinit__(self, loop, Stream stream):
        self.items = collections.deque()
        self.sizes = collections.deque()
        self.loop = loop
        self.stream = stream

    cdef void push(self, bytes msg, Py_ssize_t wire_bytes):
        self.items.append(msg)
        self.sizes.append(wire_bytes)
        self.queued_bytes += wire_bytes
        self._wake()

    cdef void end(self, error=None):
        self.ended = True
        if error is not None and self.error is None:
            self.error = error
            self.stream = None
        self._wake()

    cdef void _wake(self):
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        while not self.items:
            if self.error is not None:
                raise self.error
            if self.ended:
                raise StopAsyncIteration
            self.waiter = self.loop.create_future()
            await self.waiter
        self.queued_bytes -= self.sizes.popleft()
        if self.stream is not None:
            self.stream.release_window()
        return self.items.popleft()


# ------------------------------------------------------------------------------------------ streams


cdef class Stream:
    """One gRPC call: its request state, its handler task and its queue of outgoing bytes."""

    cdef Connection conn
    cdef int32_t sid
    cdef int req_state
    cdef bytes path
    cdef bytes encoding
    cdef bytes timeout_value
    cdef int kind
    cdef object handler
    cdef bytearray inbuf
    cdef object first_message   # unary: the request (later messages are ignored, as grpcio does)
    cdef RequestIterator requests
    cdef object task
    cdef object deadline
    # Output: a queue of bytes objects, the read offset into the first, and the bytes not yet pulled.
    cdef object outq
    cdef Py_ssize_t out_off
    cdef readonly Py_ssize_t pending
    cdef bint response_started  # response HEADERS submitted (with the data provider)
    cdef bint finished          # the status is decided; trailers go out once the queue drains
    cdef bint deferred          # the data provider returned NGHTTP2_ERR_DEFERRED
    cdef readonly bint closed   # nghttp2 closed the stream (done, reset, or connection gone)
    cdef list trailers
    cdef object send_waiter
    # Received DATA bytes not yet given back to the peer's stream window (at most the bytes of the
    # requests queued for a bidi handler; everything else is given back as it arrives).
    cdef Py_ssize_t unconsumed
    cdef object rpc       # RpcMetrics of the method (None for an unknown one, as grpcio counts)
    cdef bint counted     # grpc_server_handled_total has this call
    cdef bytes token      # the "token" request header: etcd's auth token (call_context.Caller)
    cdef bint require_leader  # "hasleader: true" (call_context.Caller.require_leader)
    cdef bytes method
    cdef bint grpc        # content-type application/grpc[+...]
    cdef bint http        # not a gRPC call: answered by the HTTP responder once the request ends

    def __cinit__(self, Connection conn, int32_t sid):
        self.conn = conn
        self.sid = sid
        self.outq = collections.deque()

    # ---- request side

    cdef int on_data(self, const uint8_t *data, size_t n) except -1:
        """Take a DATA payload: its messages go to the call, its bytes back to the window when due."""
        self.unconsumed += n
        if self.req_state != REQ_BODY or self.http:
            self.release_window()
            return 0
        try:
            return self.split_messages(data, n)
        finally:
            self.release_window()

    cdef int split_messages(self, const uint8_t *data, size_t n) except -1:
        """Split a DATA payload into gRPC messages (whole ones straight from nghttp2's buffer)."""
        cdef Py_ssize_t limit = self.conn.config.max_message_bytes
        cdef size_t length, pos = 0
        cdef uint8_t flag
        cdef const uint8_t *p
        if self.inbuf is None or len(self.inbuf) == 0:
            # Fast path: parse in place; only a trailing partial message is copied.
            while n - pos >= 5:
                p = data + pos
                flag = p[0]
                length = (<size_t>p[1] << 24) | (<size_t>p[2] << 16) | (<size_t>p[3] << 8) | p[4]
                if length > <size_t>limit:
                    return self.too_large(length)
                if n - pos - 5 < length:
                    break
                self.on_message(flag, PyBytes_FromStringAndSize(<const char *>p + 5, length))
                pos += 5 + length
                if self.req_state != REQ_BODY:
                    return 0
            if pos < n:
                if self.inbuf is None:
                    self.inbuf = bytearray()
                self.inbuf += (<const char *>data)[pos:n]
                return self.check_header()
            return 0
        self.inbuf += (<const char *>data)[:n]
        while self.req_state == REQ_BODY:
            if self.check_header() < 0 or len(self.inbuf) < 5:
                return 0
            length = int.from_bytes(self.inbuf[1:5], "big")
            if len(self.inbuf) < 5 + <Py_ssize_t>length:
                return 0
            flag = self.inbuf[0]
            msg = bytes(self.inbuf[5:5 + length])
            del self.inbuf[:5 + length]
            self.on_message(flag, msg)
        return 0

    cdef int check_header(self) except -2:
        """Refuse an oversized message as soon as its length prefix is in (not after buffering it)."""
        cdef size_t length
        if len(self.inbuf) >= 5:
            length = int.from_bytes(self.inbuf[1:5], "big")
            if length > <size_t>self.conn.config.max_message_bytes:
                self.too_large(length)
                return -1
        return 0

    cdef int too_large(self, size_t length) except -1:
        # grpc-go's words (etcd's): clients show this text, and etcd's is what they are used to.
        self.fail(GRPC_RESOURCE_EXHAUSTED,
                  f"grpc: received message larger than max ({length} vs. "
                  f"{self.conn.config.max_message_bytes})")
        return 0

    cdef on_message(self, uint8_t flag, bytes msg):
        cdef Py_ssize_t wire_bytes = 5 + len(msg)
        if flag & 1:
            msg = self.decompress(msg)
            if msg is None:
                return
        RECEIVED_BYTES.n += len(msg)
        if self.kind == KIND_BIDI:
            self.requests.push(msg, wire_bytes)
        elif self.first_message is None:
            self.first_message = msg

    cdef object decompress(self, bytes msg):
        cdef Py_ssize_t limit = self.conn.config.max_message_bytes
        enc = self.encoding
        if enc is None or enc == b"identity":
            self.fail(GRPC_INTERNAL, MSG_COMPRESSED_NO_ENCODING)
            return None
        if enc == b"gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == b"deflate":
            d = zlib.decompressobj()
        else:
            # grpc-go's answer (etcd's); grpcio refuses the header itself with INTERNAL.
            self.fail(GRPC_UNIMPLEMENTED,
                      f'grpc: Decompressor is not installed for grpc-encoding "{enc.decode("latin-1")}"')
            return None
        try:
            out = d.decompress(msg, limit + 1)
        except zlib.error as e:
            self.fail(GRPC_INTERNAL, f"grpc: failed to decompress the received message: {e}")
            return None
        if len(out) > limit or d.unconsumed_tail:
            self.fail(GRPC_RESOURCE_EXHAUSTED,
                      f"grpc: received message after decompression larger than max "
                      f"({len(out)} vs. {limit})")
            return None
        return out

    cdef void release_window(self) except *:
        """Give the peer back the stream window for every received byte not held by a queued request."""
        cdef Py_ssize_t held = 0, give
        if self.requests is not None and self.req_state != REQ_IGNORED:
            held = self.requests.queued_bytes
        give = self.unconsumed - held
        if give <= 0 or self.closed or self.conn.session == NULL:
            return
        self.unconsumed = held
        nghttp2_session_consume_stream(self.conn.session, self.sid, give)
        self.conn.schedule_flush()

    cdef on_request_end(self):
        """The client half-closed: a unary call runs now; a bidi stream's iterator ends."""
        if self.req_state == REQ_IGNORED:
            return
        self.req_state = REQ_DONE
        if self.http:
            self.respond_http()
            return
        if self.kind == KIND_BIDI:
            self.requests.end()
            return
        msg = self.first_message
        self.first_message = None
        if msg is None:
            self.fail(GRPC_INTERNAL, MSG_NO_REQUEST)
            return
        if self.kind == KIND_DIRECT and self.conn.over_budget:
            # Reading stopped at the budget, but the calls already read still come in (one read can hold
            # hundreds): they wait their turn instead of each queueing its answer.
            self.conn.deferred.append((self, msg))
            return
        self.start_unary(msg)

    cdef start_unary(self, bytes msg):
        # The handler sees its caller through CALLER (a task copies the context it is created in). The
        # connection's context holds the default, anonymous caller: set only when there is someone.
        caller = None
        if self.token is not None or self.conn.common_name is not None or self.require_leader:
            caller = CALLER.set(self.caller())
        try:
            if self.kind == KIND_DIRECT:
                self.run_direct(msg)
            else:
                self.task = self.conn.loop.create_task(self.run_unary(msg))
        finally:
            if caller is not None:
                CALLER.reset(caller)

    cdef object caller(self):
        # The token header, and the client certificate's CN kept by the connection (--client-cert-auth)
        cn = self.conn.common_name
        if self.token is None:
            if cn is None:
                return ANONYMOUS_REQUIRING_LEADER if self.require_leader else ANONYMOUS
            return Caller(None, cn, self.require_leader)
        return Caller(self.token.decode("utf-8", "replace"), cn, self.require_leader)

    cdef run_direct(self, bytes msg):
        try:
            resp = self.handler(msg)
        except Exception as e:
            code, text = status_for(e)
            self.fail(code, text)
            return
        if type(resp) is bytes:
            self.respond(resp)
        else:
            # Held as the call's task, so a client that goes away (RST_STREAM, its deadline) cancels it:
            # a write forwarded to the leader then stops retrying at the next one, instead of committing
            # seconds after its client saw the call fail. A write the engine has queued stays queued (its
            # future's cancellation does not withdraw it), as a proposal does in etcd.
            self.task = resp
            self.conn.awaiting += 1
            resp.add_done_callback(self.on_answer)

    def on_answer(self, fut):
        """A direct handler's future resolved: answer (unless the call already ended)."""
        cdef Connection conn = self.conn
        self.task = None
        conn.awaiting -= 1
        if self.finished or self.closed or fut.cancelled():
            return
        conn.flush_held = True
        try:
            exc = fut.exception()
            if exc is not None:
                code, text = status_for(exc)
                self.fail(code, text)
            else:
                self.respond(fut.result())
        finally:
            conn.flush_held = False
        if conn.awaiting:
            conn.schedule_flush()  # the connection's other answers are due in this batch too: one write
        else:
            conn.flush()  # its last pending write answered: out now, not one loop iteration later

    async def run_unary(self, bytes msg):
        try:
            if self.conn.over_budget:
                await self.conn.output_room()
                if self.closed:
                    return
            resp = await self.handler(msg)
        except asyncio.CancelledError:
            return  # the client went away or the deadline passed (already answered)
        except Exception as e:
            # Dropping the task first: fail() must not cancel the task it runs in, and the
            # stream → task → coroutine → stream cycle is broken without waiting for the GC.
            self.task = None
            code, text = status_for(e)
            self.fail(code, text)
            return
        self.task = None
        self.respond(resp)

    async def run_bidi(self):
        cdef int code = GRPC_OK
        cdef str text = ""
        try:
            await self.handler(self.requests, self.send)
        except asyncio.CancelledError:
            return
        except StreamClosed:
            return
        except Exception as e:
            code, text = status_for(e)
        self.task = None  # as in run_unary
        self.finish(code, text)

    def on_deadline(self):
        self.deadline = None
        if self.finished or self.closed:
            return
        self.fail(GRPC_DEADLINE_EXCEEDED, MSG_DEADLINE)

    # ---- response side

    async def send(self, bytes msg):
        """A bidi handler's send: waits while this stream has stream_buffer_bytes or more queued."""
        cdef Py_ssize_t limit = self.conn.config.stream_buffer_bytes
        while self.pending >= limit and not self.closed and not self.finished:
            self.send_waiter = self.conn.loop.create_future()
            try:
                await self.send_waiter
            finally:
                self.send_waiter = None
        if self.conn.over_budget and not self.closed:
            await self.conn.output_room()
        if self.closed or self.finished:
            raise StreamClosed("the stream is closed")
        self.enqueue(msg)
        self.conn.schedule_flush()

    cdef enqueue(self, bytes msg):
        cdef Py_ssize_t n = len(msg)
        SENT_BYTES.n += n
        self.outq.append(b"\x00" + n.to_bytes(4, "big"))
        if n:
            self.outq.append(msg)
        self.pending += 5 + n
        self.conn.buffered += 5 + n
        self.conn.buffered_changed()
        self.start_or_resume()

    cdef start_or_resume(self):
        cdef nghttp2_data_provider prd
        cdef nghttp2_nv *nva
        cdef int rv
        if self.conn.session == NULL or self.closed:
            return
        if not self.response_started:
            self.response_started = True
            prd.source.ptr = <void *>self
            prd.read_callback = data_source_read
            nva = make_nva(RESPONSE_HEADERS)
            rv = nghttp2_submit_response(self.conn.session, self.sid, nva, len(RESPONSE_HEADERS), &prd)
            free(nva)
            if rv != 0:
                log.debug("nghttp2_submit_response: %s", nghttp2_strerror(rv).decode())
        elif self.deferred:
            self.deferred = False
            nghttp2_session_resume_data(self.conn.session, self.sid)

    cdef respond_http(self):
        """A plain HTTP/2 request (no gRPC content-type): answered as etcd's HTTP mux answers it over TLS
        (/health, /version, /metrics, ..., and 404 for the rest), a body and no trailers."""
        cdef nghttp2_data_provider prd
        cdef nghttp2_nv *nva
        method = (self.method or b"GET").decode("latin-1")
        try:
            status, content_type, body = self.conn.config.http_respond(method, (self.path or b"/").decode("latin-1"))
        except Exception as e:
            log.error("native transport: HTTP responder failed", exc_info=e)
            status, content_type, body = 500, http1.TEXT, b"Internal Server Error\n"
        self.finished = True
        if self.closed or self.conn.session == NULL:
            return
        headers = [(H_STATUS, str(status).encode()), (H_CONTENT_TYPE, content_type.encode("latin-1")),
                   (H_CONTENT_LENGTH, str(len(body)).encode())]
        nva = make_nva(headers)
        if method == "HEAD" or not body:
            nghttp2_submit_response(self.conn.session, self.sid, nva, len(headers), NULL)
        else:
            self.outq.append(body)
            self.pending += len(body)
            self.conn.buffered += len(body)
            self.conn.buffered_changed()
            self.response_started = True
            prd.source.ptr = <void *>self
            prd.read_callback = data_source_read
            nghttp2_submit_response(self.conn.session, self.sid, nva, len(headers), &prd)
        free(nva)
        self.conn.schedule_flush()

    cdef respond(self, bytes msg):
        """A unary call's answer: headers, the message, OK trailers."""
        if self.finished or self.closed:
            return
        self.enqueue(msg)
        self.finish(GRPC_OK, "")

    cdef fail(self, int code, str message):
        """End the call with an error status; before any response bytes this is a trailers-only answer."""
        cdef nghttp2_nv *nva
        cdef list headers
        if self.req_state != REQ_DONE:
            self.req_state = REQ_IGNORED
        if self.kind == KIND_BIDI and self.requests is not None:
            self.requests.end()
        if self.finished or self.closed:
            return
        if self.response_started:
            self.finish(code, message)
            if self.task is not None:
                self.task.cancel()
            return
        self.finished = True
        self.count(code)
        self.cancel_deadline()
        if self.task is not None:
            self.task.cancel()
        if self.conn.session == NULL:
            return
        headers = [(H_STATUS, H_200), (H_CONTENT_TYPE, H_GRPC)] + status_trailers(code, message)
        nva = make_nva(headers)
        nghttp2_submit_response(self.conn.session, self.sid, nva, len(headers), NULL)
        free(nva)
        self.conn.schedule_flush()

    cdef finish(self, int code, str message):
        """Trailers follow once the queued messages are pulled (see data_source_read)."""
        if self.finished or self.closed:
            return
        if not self.response_started and code != GRPC_OK:
            self.fail(code, message)  # nothing sent yet: a trailers-only answer
            return
        self.finished = True
        self.count(code)
        self.cancel_deadline()
        self.trailers = status_trailers(code, message)
        self.start_or_resume()  # submits the headers if no message went out (an empty OK stream)
        self.wake_sender()
        self.conn.schedule_flush()

    cdef void count(self, int code) except *:
        """grpc_server_handled_total, once per call."""
        if self.rpc is not None and not self.counted:
            self.counted = True
            self.rpc.handled(CODE_NAMES.get(code, "UNKNOWN"))

    cdef void cancel_deadline(self):
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    cdef void wake_sender(self):
        w = self.send_waiter
        if w is not None and not w.done():
            w.set_result(None)

    cdef ssize_t read(self, uint8_t *buf, size_t length, uint32_t *data_flags) except -1:
        """nghttp2 pulls up to ``length`` bytes of DATA for this stream."""
        cdef size_t copied = 0, take, avail
        cdef bytes chunk
        cdef nghttp2_nv *nva
        cdef Py_ssize_t limit
        while copied < length and self.outq:
            chunk = self.outq[0]
            avail = PyBytes_GET_SIZE(chunk) - self.out_off
            take = avail if avail <= length - copied else length - copied
            memcpy(buf + copied, PyBytes_AS_STRING(chunk) + self.out_off, take)
            copied += take
            if take == avail:
                self.outq.popleft()
                self.out_off = 0
            else:
                self.out_off += take
        self.pending -= copied
        self.conn.buffered -= copied
        if copied and self.conn.over_budget:
            self.conn.buffered_changed()
        if copied and self.send_waiter is not None:
            limit = self.conn.config.stream_buffer_bytes
            if self.pending < limit:
                self.wake_sender()
        if not self.outq and self.finished and self.trailers is None:
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF  # an HTTP answer: its last DATA ends the stream
            return copied
        if not self.outq and self.finished:
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
            nva = make_nva(self.trailers)
            nghttp2_submit_trailer(self.conn.session, self.sid, nva, len(self.trailers))
            free(nva)
            return copied
        if copied == 0:
            self.deferred = True
            return NGHTTP2_ERR_DEFERRED
        return copied

    cdef on_close(self, uint32_t error_code):
        """nghttp2 closed the stream: stop the handler unless it already finished."""
        self.closed = True
        if not self.finished:
            self.count(GRPC_CANCELLED)
        self.cancel_deadline()
        self.conn.buffered -= self.pending
        self.pending = 0
        self.outq.clear()
        self.conn.buffered_changed()
        if self.requests is not None:
            self.requests.end(StreamClosed("the stream was reset"))
        if self.task is not None and not self.task.done() and not self.finished:
            self.task.cancel()
        self.wake_sender()


# ------------------------------------------------------------------------------------------ callbacks
# Plain C functions for nghttp2; each hands over to the Connection (user_data) and turns a Python
# exception into a session failure, which drops the connection. They look alike on purpose: nghttp2 takes
# one C function per event, each with its own signature, so the trampolines cannot be one generic function.


cdef int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame,
                          void *user_data) noexcept:
    try:
        return (<Connection>user_data).begin_headers(frame)
    except BaseException as e:
        log.error("native transport: error in on_begin_headers", exc_info=e)
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                   size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                   void *user_data) noexcept:
    try:
        return (<Connection>user_data).header(frame, name, namelen, value, valuelen)
    except BaseException as e:
        log.error("native transport: error in on_header", exc_info=e)
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int on_data_chunk_recv(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                            const uint8_t *data, size_t length, void *user_data) noexcept:
    try:
        return (<Connection>user_data).data_chunk(stream_id, data, length)
    except BaseException as e:
        log.error("native transport: error in on_data_chunk_recv", exc_info=e)
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    try:
        return (<Connection>user_data).frame_recv(frame)
    except BaseException as e:
        log.error("native transport: error in on_frame_recv", exc_info=e)
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    try:
        return (<Connection>user_data).frame_send(frame)
    except BaseException as e:
        log.error("native transport: error in on_frame_send", exc_info=e)
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                         void *user_data) noexcept:
    try:
        return (<Connection>user_data).stream_close(stream_id, error_code)
    except BaseException as e:
        log.error("native transport: error in on_stream_close", exc_info=e)
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef ssize_t data_source_read(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                              uint32_t *data_flags, nghttp2_data_source *source,
                              void *user_data) noexcept:
    try:
        return (<Stream>source.ptr).read(buf, length, data_flags)
    except BaseException as e:
        log.error("native transport: error in the data provider", exc_info=e)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE


cdef nghttp2_session_callbacks *CALLBACKS = NULL
cdef nghttp2_option *OPTION = NULL            # with a bounded MAX_CONCURRENT_STREAMS
cdef nghttp2_option *OPTION_NO_CLOSED = NULL  # without one (see ServerConfig)


cdef void init_library() except *:
    global CALLBACKS, OPTION, OPTION_NO_CLOSED
    if (nghttp2_session_callbacks_new(&CALLBACKS) != 0 or nghttp2_option_new(&OPTION) != 0
            or nghttp2_option_new(&OPTION_NO_CLOSED) != 0):
        raise MemoryError()
    nghttp2_session_callbacks_set_on_begin_headers_callback(CALLBACKS, on_begin_headers)
    nghttp2_session_callbacks_set_on_header_callback(CALLBACKS, on_header)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(CALLBACKS, on_data_chunk_recv)
    nghttp2_session_callbacks_set_on_frame_recv_callback(CALLBACKS, on_frame_recv)
    nghttp2_session_callbacks_set_on_frame_send_callback(CALLBACKS, on_frame_send)
    nghttp2_session_callbacks_set_on_stream_close_callback(CALLBACKS, on_stream_close)
    # Receive windows are given back by hand, so that unread requests hold the client back.
    nghttp2_option_set_no_auto_window_update(OPTION, 1)
    nghttp2_option_set_no_auto_window_update(OPTION_NO_CLOSED, 1)
    nghttp2_option_set_no_closed_streams(OPTION_NO_CLOSED, 1)


init_library()


# ------------------------------------------------------------------------------------------ connection

cdef enum:
    MODE_SNIFF = 0
    MODE_H2 = 1
    MODE_H1 = 2
    MODE_CLOSED = 3


cdef class Connection:
    """asyncio Protocol for one client connection: HTTP/2 (gRPC) or, by its first bytes, HTTP/1.x."""

    cdef ServerConfig config
    cdef object loop
    cdef object transport
    cdef nghttp2_session *session
    cdef dict streams
    cdef int mode
    cdef bytes sniffed
    cdef object h1
    cdef readonly Py_ssize_t buffered    # message bytes queued on this connection's streams
    # buffered reached config.connection_buffer_bytes: no new call starts and nothing more is read until
    # the client takes some (a client that opens many calls and never reads holds a bounded amount)
    cdef readonly bint over_budget
    cdef list room_waiters
    cdef readonly object deferred        # (stream, request) of direct calls read while over budget
    cdef bint reading_paused
    cdef bint write_paused
    cdef bint flush_scheduled
    cdef Py_ssize_t awaiting             # direct calls whose answer is a pending future (writes)
    # inside feed() or Stream.on_answer, which flush (or schedule a flush) at their end
    cdef bint flush_held
    cdef bint draining                   # final GOAWAY sent: close once the last stream is done
    cdef bint close_after_flush
    # grpc-go's keepalive enforcement (ping strikes), per connection
    cdef double last_ping
    cdef int ping_strikes
    cdef bint reset_ping_strikes
    # aborts a connection that does not finish its handshake (or its lingering close) in time
    cdef object handshake_timer
    cdef readonly bint drain_acked       # the client answered the ping sent with the shutdown notice
    # the write batch
    cdef uint8_t *wbuf
    cdef size_t wlen, wcap
    # The verified client certificate's CN under --client-cert-auth (set by native_transport.py's TLS
    # connection before any stream), else None.
    cdef public object common_name

    def __cinit__(self, ServerConfig config):
        self.config = config
        self.streams = {}
        self.room_waiters = []
        self.deferred = collections.deque()
        self.sniffed = b""

    def __dealloc__(self):
        if self.session != NULL:
            nghttp2_session_del(self.session)
            self.session = NULL
        if self.wbuf != NULL:
            free(self.wbuf)
            self.wbuf = NULL

    # ---- asyncio Protocol

    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.config.connections.add(self)  # asyncio and uvloop set TCP_NODELAY themselves
        self.arm_handshake_timer()

    cdef void arm_handshake_timer(self) except *:
        # grpc-go's ConnectionTimeout: the client preface and its first SETTINGS frame must arrive within
        # the deadline, however slowly the bytes trickle in. (HTTP/1: each request head, including the
        # wait for it on an idle keep-alive connection.)
        if self.config.handshake_timeout > 0:
            self.arm_timer(self.config.handshake_timeout)

    cdef void arm_timer(self, double seconds) except *:
        self.cancel_handshake_timer()
        self.handshake_timer = self.loop.call_later(seconds, self.handshake_expired)

    cdef void cancel_handshake_timer(self):
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None

    def handshake_expired(self):
        self.handshake_timer = None
        if self.transport is not None:
            log.debug("native transport: closing a connection that did not finish its handshake (or its "
                      "lingering close) in time")
            self.mode = MODE_CLOSED
            self.transport.abort()

    def connection_lost(self, exc):
        self.mode = MODE_CLOSED
        self.cancel_handshake_timer()
        self.config.connections.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for s in streams:
            (<Stream>s).on_close(NGHTTP2_CANCEL)
        if self.session != NULL:
            nghttp2_session_del(self.session)
            self.session = NULL
        self.transport = None
        self.deferred.clear()
        self.wake_room_waiters()  # they see the connection gone

    def pause_writing(self):
        # The socket is not draining: stop producing frames and stop reading requests (which would
        # produce more) until it is.
        self.write_paused = True
        self.update_reading()

    def resume_writing(self):
        self.write_paused = False
        if self.transport is not None:
            self.update_reading()
            self.flush()

    cdef void update_reading(self) except *:
        cdef bint pause = self.write_paused or self.over_budget
        if pause != self.reading_paused and self.transport is not None and self.mode != MODE_CLOSED:
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    cdef void buffered_changed(self) except *:
        cdef bint over = self.buffered >= self.config.connection_buffer_bytes
        if over == self.over_budget:
            return
        self.over_budget = over
        self.update_reading()
        if not over:
            self.wake_room_waiters()

    cdef void wake_room_waiters(self):
        waiters, self.room_waiters = self.room_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        if self.deferred and self.transport is not None:
            self.loop.call_soon(self.run_deferred)  # not from inside nghttp2's callbacks

    def run_deferred(self):
        cdef Stream s
        while self.deferred and not self.over_budget and self.transport is not None:
            s, msg = self.deferred.popleft()
            if not s.closed and not s.finished:
                s.start_unary(msg)
        self.flush()

    async def output_room(self):
        """Wait until this connection's queued output is below its budget (or the connection is gone)."""
        while self.over_budget and self.transport is not None:
            waiter = self.loop.create_future()
            self.room_waiters.append(waiter)
            await waiter

    def eof_received(self):
        return False  # close our side too

    def data_received(self, bytes data):
        if self.mode == MODE_H2:
            self.feed(data)
        elif self.mode == MODE_SNIFF:
            self.sniff(data)
        elif self.mode == MODE_H1:
            self.feed_h1(data)

    # ---- protocol detection

    cdef sniff(self, bytes data):
        cdef bytes buf = self.sniffed + data
        cdef Py_ssize_t n = min(len(buf), len(PREFACE))
        if buf[:n] == PREFACE[:n]:
            if n < len(PREFACE):
                self.sniffed = buf
                return
            self.sniffed = b""
            self.start_h2()
            self.feed(buf)
            return
        # An HTTP/1.x request starts with an upper-case method token and a space, and its first line
        # ends in HTTP/1.0 or HTTP/1.1. Anything else (say, a mistyped HTTP/2 preface) is closed without
        # an answer: an HTTP/2 client would read an HTTP/1 answer as a broken frame.
        cdef Py_ssize_t i = 0, nl
        while i < len(buf) and i < 16 and 65 <= buf[i] <= 90:
            i += 1
        if i == len(buf) and i < 16:
            self.sniffed = buf  # could still be a method name
            return
        if 0 < i < 16 and buf[i] == 32:
            nl = buf.find(b"\n")
            if nl < 0 and len(buf) <= MAX_REQUEST_LINE:
                self.sniffed = buf
                return
            if nl >= 0 and http1.is_request_line(buf[:nl]):
                self.sniffed = b""
                self.mode = MODE_H1
                self.h1 = http1.Http1Session(self.config.http_respond)
                self.feed_h1(buf)
                return
        log.debug("native transport: closing a connection that speaks neither HTTP/2 nor HTTP/1")
        self.mode = MODE_CLOSED
        self.transport.close()

    cdef feed_h1(self, bytes data):
        out = self.h1.feed(data)
        if out:
            self.transport.write(out)
            self.arm_handshake_timer()  # the next request head has as long as the first
        if self.h1.closed:
            self.mode = MODE_CLOSED
            self.transport.close()

    # ---- HTTP/2

    cdef start_h2(self):
        cdef nghttp2_settings_entry iv[2]
        cdef size_t niv = 0
        cdef int rv = nghttp2_session_server_new2(&self.session, CALLBACKS, <void *>self, self.config.option)
        if rv != 0:
            raise MemoryError(nghttp2_strerror(rv).decode())
        self.mode = MODE_H2
        iv[niv].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        iv[niv].value = <uint32_t>self.config.window_bytes
        niv += 1
        if self.config.max_concurrent_streams != UNLIMITED_STREAMS:  # unadvertised is unlimited
            iv[niv].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
            iv[niv].value = self.config.max_concurrent_streams
            niv += 1
        nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, iv, niv)
        # The connection window, too: large requests (1.5 MiB puts) must not wait a round trip per 64 KiB.
        nghttp2_session_set_local_window_size(self.session, NGHTTP2_FLAG_NONE, 0, self.config.window_bytes)

    cdef feed(self, bytes data):
        cdef ssize_t rv
        self.flush_held = True
        try:
            rv = nghttp2_session_mem_recv(
                self.session, <const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        finally:
            self.flush_held = False
        if rv < 0:
            log.debug("native transport: HTTP/2 session error: %s", nghttp2_strerror(<int>rv).decode())
            # nghttp2 says why in a GOAWAY itself for most errors; for these fatal ones (a bad preface, a
            # flood, a header block of too many CONTINUATIONs) it leaves the connection to us: say it too.
            if rv != NGHTTP2_ERR_BAD_CLIENT_MAGIC:
                nghttp2_session_terminate_session(
                    self.session, NGHTTP2_PROTOCOL_ERROR if rv == NGHTTP2_ERR_CALLBACK_FAILURE
                    else NGHTTP2_ENHANCE_YOUR_CALM)
            self.close_after_flush = True
        if self.awaiting and not self.close_after_flush:
            # A write is being made durable: what this read produced (the PING ack grpc-go's BDP estimator
            # asks for with every request, window updates) goes out after the writer has handed it to the
            # commit log, overlapping its fdatasync instead of delaying it by a socket write. (Flushes
            # asked for while feeding were left to here: queued before the writer's wake-up, they would
            # run first.)
            self.schedule_flush()
        else:
            self.flush()

    cdef void schedule_flush(self):
        if not self.flush_scheduled and not self.flush_held and self.mode == MODE_H2:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    cpdef flush(self):
        """Serialize what nghttp2 has to send and write it, unless the socket is backed up."""
        cdef const uint8_t *data
        cdef ssize_t n
        self.flush_scheduled = False
        if self.session == NULL or self.transport is None or self.mode == MODE_CLOSED:
            return
        while not self.write_paused:
            n = nghttp2_session_mem_send(self.session, &data)
            if n < 0:
                log.debug("native transport: nghttp2_session_mem_send: %s", nghttp2_strerror(<int>n).decode())
                self.write_out()
                self.mode = MODE_CLOSED
                self.transport.close()
                return
            if n == 0:
                break
            self.append_out(data, n)
            if self.wlen >= WRITE_CHUNK:
                self.write_out()  # may call pause_writing
        self.write_out()
        if self.transport is None:
            return
        if (self.close_after_flush or (self.draining and not self.streams)
                or (not nghttp2_session_want_read(self.session)
                    and not nghttp2_session_want_write(self.session))):
            self.close_lingering()

    cdef void close_lingering(self) except *:
        """Close our side, then wait (briefly) for the client to close its side. Closing the socket while the
        client's bytes still arrive makes the kernel reset the connection, and a reset can destroy our last
        frames (a GOAWAY, a PING answer) before the client reads them."""
        self.mode = MODE_CLOSED  # what still arrives is read and dropped
        if self.write_paused or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.arm_timer(LINGER_SECONDS)

    cdef void append_out(self, const uint8_t *data, size_t n) except *:
        cdef size_t cap
        cdef uint8_t *grown
        if self.wlen + n > self.wcap:
            cap = max(self.wcap * 2, self.wlen + n, <size_t>WRITE_CHUNK)
            grown = <uint8_t *>realloc(self.wbuf, cap)
            if grown == NULL:
                raise MemoryError()
            self.wbuf = grown
            self.wcap = cap
        memcpy(self.wbuf + self.wlen, data, n)
        self.wlen += n

    cdef void write_out(self) except *:
        if self.wlen:
            out = PyBytes_FromStringAndSize(<const char *>self.wbuf, self.wlen)
            self.wlen = 0
            self.transport.write(out)

    # nghttp2 callbacks, via the C trampolines above

    cdef int begin_headers(self, const nghttp2_frame *frame) except -1:
        if frame.hd.type == NGHTTP2_HEADERS and frame.headers.cat == NGHTTP2_HCAT_REQUEST:
            self.streams[frame.hd.stream_id] = Stream(self, frame.hd.stream_id)
        return 0

    cdef int header(self, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                    const uint8_t *value, size_t valuelen) except -1:
        cdef Stream s
        if frame.hd.type != NGHTTP2_HEADERS or frame.headers.cat != NGHTTP2_HCAT_REQUEST:
            return 0  # request trailers carry nothing gRPC servers read
        s = self.streams.get(frame.hd.stream_id)
        if s is None:
            return 0
        if namelen == 5 and memcmp(name, b":path", 5) == 0:
            s.path = PyBytes_FromStringAndSize(<const char *>value, valuelen)
        elif namelen == 7 and memcmp(name, b":method", 7) == 0:
            s.method = PyBytes_FromStringAndSize(<const char *>value, valuelen)
        elif namelen == 12 and memcmp(name, b"content-type", 12) == 0:
            # application/grpc, optionally +proto or ;params (gRPC's HTTP/2 spec)
            s.grpc = valuelen >= 16 and memcmp(value, b"application/grpc", 16) == 0 and (
                valuelen == 16 or value[16] == 43 or value[16] == 59)
        elif namelen == 13 and memcmp(name, b"grpc-encoding", 13) == 0:
            s.encoding = PyBytes_FromStringAndSize(<const char *>value, valuelen)
        elif namelen == 12 and memcmp(name, b"grpc-timeout", 12) == 0:
            s.timeout_value = PyBytes_FromStringAndSize(<const char *>value, valuelen)
        elif namelen == 5 and memcmp(name, b"token", 5) == 0:
            s.token = PyBytes_FromStringAndSize(<const char *>value, valuelen)
        elif namelen == 9 and memcmp(name, b"hasleader", 9) == 0:
            s.require_leader = valuelen == 4 and memcmp(value, b"true", 4) == 0
        return 0

    cdef int data_chunk(self, int32_t stream_id, const uint8_t *data, size_t length) except -1:
        # The connection window is given back at once (memory is bounded per stream, below); the
        # stream's window only as its requests are taken (Stream.release_window).
        cdef Stream s
        nghttp2_session_consume_connection(self.session, length)
        s = self.streams.get(stream_id)
        if s is not None:
            s.on_data(data, length)
        return 0

    cdef int frame_recv(self, const nghttp2_frame *frame) except -1:
        cdef Stream s
        cdef uint8_t t = frame.hd.type
        if t == NGHTTP2_HEADERS or t == NGHTTP2_DATA:
            s = self.streams.get(frame.hd.stream_id)
            if s is None:
                return 0
            if t == NGHTTP2_HEADERS and frame.headers.cat == NGHTTP2_HCAT_REQUEST:
                self.start_call(s)
            if frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
                s.on_request_end()
        elif t == NGHTTP2_PING:
            if not (frame.hd.flags & NGHTTP2_FLAG_ACK):
                self.on_ping()
            elif memcmp(frame.ping.opaque_data, <const char *>DRAIN_PING, 8) == 0:
                self.drain_acked = True
        elif t == NGHTTP2_SETTINGS and self.handshake_timer is not None and self.mode == MODE_H2:
            self.cancel_handshake_timer()  # the preface and the client's SETTINGS are in
        return 0

    cdef start_call(self, Stream s):
        s.req_state = REQ_BODY
        if not s.grpc:
            s.http = True
            return
        route = self.config.routes.get(s.path)
        if route is None:
            s.fail(GRPC_UNIMPLEMENTED, MSG_METHOD_NOT_FOUND)
            return
        s.kind, s.handler, s.rpc = route
        s.rpc.start()
        if s.timeout_value is not None:
            timeout = parse_timeout(s.timeout_value)
            if timeout is None:
                s.fail(GRPC_INTERNAL, MSG_BAD_TIMEOUT)
                return
            s.deadline = self.loop.call_later(timeout, s.on_deadline)
        if s.kind == KIND_BIDI:
            s.requests = RequestIterator(self.loop, s)
            caller = CALLER.set(s.caller())
            try:
                s.task = self.loop.create_task(s.run_bidi())
            finally:
                CALLER.reset(caller)

    cdef int frame_send(self, const nghttp2_frame *frame) except -1:
        cdef Stream s
        cdef uint8_t t = frame.hd.type
        if t == NGHTTP2_HEADERS or t == NGHTTP2_DATA:
            self.reset_ping_strikes = True  # grpc-go: sending data makes the client's pings legitimate
            if frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
                # We answered before the client finished sending: tell it to stop (as grpc-go does).
                s = self.streams.get(frame.hd.stream_id)
                if s is not None and not nghttp2_session_get_stream_remote_close(self.session, s.sid):
                    nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, s.sid, NGHTTP2_NO_ERROR)
        return 0

    cdef int stream_close(self, int32_t stream_id, uint32_t error_code) except -1:
        s = self.streams.pop(stream_id, None)
        if s is not None:
            (<Stream>s).on_close(error_code)
        if self.draining and not self.streams:
            self.schedule_flush()  # flush() closes the drained connection
        return 0

    cdef on_ping(self):
        """grpc-go's handlePing: a ping sooner than min_ping_interval after the last, with no HEADERS or
        DATA sent in between, is a strike; with no stream open (unless permit_without_stream) any ping
        within two hours of the last is. The third strike closes the connection with ENHANCE_YOUR_CALM."""
        cdef double now = time.monotonic()
        cdef double last = self.last_ping
        cdef double interval = self.config.min_ping_interval
        self.last_ping = now
        if self.reset_ping_strikes:
            self.reset_ping_strikes = False
            self.ping_strikes = 0
            return
        if not self.streams and not self.config.permit_without_stream:
            interval = PING_WITHOUT_STREAM_INTERVAL
        if last and now - last < interval:
            self.ping_strikes += 1
            if self.ping_strikes > MAX_PING_STRIKES:
                log.warning("native transport: too many pings from a client, closing its connection")
                nghttp2_submit_goaway(self.session, NGHTTP2_FLAG_NONE,
                                      nghttp2_session_get_last_proc_stream_id(self.session),
                                      NGHTTP2_ENHANCE_YOUR_CALM, <const uint8_t *><const char *>b"too_many_pings", 14)
                self.close_after_flush = True

    # ---- graceful stop (driven by NativeServer)

    def shutdown_notice(self):
        """First GOAWAY: no new streams please (in-flight ones carry on), and a ping: once its answer is
        back, the client has seen the notice, so no stream it opens later is in flight (grpc-go's drain)."""
        if self.mode == MODE_H2 and self.session != NULL:
            nghttp2_submit_shutdown_notice(self.session)
            nghttp2_submit_ping(self.session, NGHTTP2_FLAG_NONE, <const uint8_t *><const char *>DRAIN_PING)
            self.flush()
        elif self.mode != MODE_CLOSED and self.transport is not None:
            self.mode = MODE_CLOSED  # sniffing or HTTP/1: nothing in flight worth waiting for
            self.transport.close()

    def goaway(self):
        """Final GOAWAY with the last stream we took; close once those streams are done."""
        if self.mode == MODE_H2 and self.session != NULL:
            nghttp2_submit_goaway(self.session, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(self.session),
                                  NGHTTP2_NO_ERROR, NULL, 0)
            self.draining = True
            self.flush()

    def end_streams(self, paths, str message):
        """End the calls on ``paths`` (streams that never end by themselves, such as Watch) with UNAVAILABLE,
        as a client of a stopping etcd sees them end; other calls on the connection carry on."""
        cdef Stream s
        for s in list(self.streams.values()):
            if s.path in paths and not s.http:
                s.fail(GRPC_UNAVAILABLE, message)
        self.flush()

    @property
    def draining_done(self):
        """No ping answer to wait for: it came back, or the connection is not (or no longer) HTTP/2."""
        return self.drain_acked or self.mode != MODE_H2 or self.session == NULL

    def abort(self):
        """Grace is over: drop the connection (connection_lost cancels what still runs)."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def closed(self):
        return self.transport is None

    @property
    def write_buffer_size(self):
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    @property
    def stream_count(self):
        return len(self.streams)

    @property
    def queued_request_bytes(self):
        cdef Stream s
        cdef Py_ssize_t total = 0
        for s in self.streams.values():
            if s.requests is not None:
                total += s.requests.queued_bytes
        return total
