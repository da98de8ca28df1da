"""Whether a server answers a write before the fdatasync that makes it durable has returned, read off strace.

One client sends puts one at a time, so while the server's log fdatasync runs exactly one put is in
flight: a gRPC response (an HTTP/2 HEADERS frame) written to a client's socket before that fdatasync
returns acknowledges a write that is not yet on disk. etcd 3.5.1 does this in a one-member cluster (it
applies and answers alongside its WAL save: etcd-io/etcd#14370, fixed in 3.5.5); fastetcd must never.

Example, from ``strace -f -yy`` of etcd 3.5.1 (thread 44 saves the WAL, thread 89 answers)::

    44 write(11</d/member/wal/0.wal>, ")\\0\\0…k3…", 96) = 96
    44 fdatasync(11</d/member/wal/0.wal> <unfinished ...>
    89 write(16<TCP:[127.0.0.1:2379->127.0.0.1:5000]>, "\\0\\0\\16\\1\\4…", 98) = 98   ← early answer
    44 <... fdatasync resumed>) = 0

An fdatasync strace prints on one line had nothing else happen while it ran, so it opens no window.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from fastetcd.proto import rpc_pb2
from fastetcd.testing.stubs import kv_stub

SYSCALLS = "fdatasync,fsync,write,writev,sendmsg,sendto"
_HEADERS = 0x1

# "1234 fdatasync(11</path>" and "1234 <... fdatasync resumed>"
_CALL = re.compile(r"^(\d+)\s+(\w+)\((\d+)<(TCP(?:v6)?:\[.*?\]|[^>]*)>")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass
class AckOrder:
    answers: int = 0
    """Writes to a client socket that carry a gRPC response (a HEADERS frame on a stream)."""
    early: int = 0
    """Of those, how many were written while a log fdatasync was running."""
    syncs: int = 0
    """Log fdatasyncs (or fsyncs) seen."""


def is_log_file(path: str) -> bool:
    """etcd's WAL segments and fastetcd's commit log: the files whose sync makes a write durable."""
    return path.endswith(".wal") or os.path.basename(path) == "fastetcd.log"


def _unhex(text: str) -> bytes:
    """strace's ``-xx`` escaping (``\\x2f\\x74…``, paths and data alike) undone."""
    return bytes.fromhex(text.replace("\\x", ""))


def _bytes(line: str) -> bytes:
    """The bytes a write-like call passed (its strings, concatenated: writev and sendmsg have several)."""
    return b"".join(_unhex(s) for s in _STRING.findall(line))


def carries_response(data: bytes) -> bool:
    """HTTP/2 frames from the start of ``data``: is one of them HEADERS on a stream (not the connection)?"""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        stream = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        if data[pos + 3] == _HEADERS and stream:
            return True
        pos += 9 + length
    return False


def parse(lines: Iterable[str], server_port: int) -> AckOrder:
    """Count answers and early answers in ``strace -f -yy -xx`` output of a server on ``server_port``."""
    result = AckOrder()
    syncing: set[str] = set()  # threads inside a log fdatasync strace printed as unfinished
    client_socket = f":{server_port}->"
    for line in lines:
        resumed = _RESUMED.match(line)
        if resumed is not None:
            if resumed.group(2) in ("fdatasync", "fsync"):
                syncing.discard(resumed.group(1))
            continue
        call = _CALL.match(line)
        if call is None:
            continue
        tid, name, _, target = call.groups()
        if target.startswith("\\x"):  # a path; sockets are printed as they are
            target = _unhex(target).decode(errors="replace")
        if name in ("fdatasync", "fsync"):
            if is_log_file(target):
                result.syncs += 1
                if line.rstrip().endswith("<unfinished ...>"):
                    syncing.add(tid)
        elif target.startswith("TCP") and client_socket in target and carries_response(_bytes(line)):
            result.answers += 1
            if syncing:
                result.early += 1
    return result


def lone_puts(endpoint: str, n: int = 100) -> Callable[[], None]:
    """The lone writer: ``n`` puts (256-byte values) one after another on one gRPC channel (grpcio)."""

    def run() -> None:
        with grpc.insecure_channel(endpoint) as channel:
            kv = kv_stub(channel)
            for i in range(n):
                kv.Put(rpc_pb2.PutRequest(key=b"durable/%06d" % i, value=b"v" * 256), timeout=10)

    return run


def trace(pid: int, server_port: int, out: Path, client: Callable[[], None]) -> AckOrder:
    """Attach strace to every thread of ``pid``, run ``client`` (the lone writer), detach, and parse."""
    proc = subprocess.Popen(
        ["strace", "-f", "-yy", "-xx", "-s", "65536", "-e", f"trace={SYSCALLS}", "-o", str(out),
         "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        # strace says "Process N attached" on stderr for each thread (or why it could not, and exits).
        assert proc.stderr is not None
        first = proc.stderr.readline()
        if "attached" not in first:
            raise RuntimeError(f"strace did not attach to {pid}: {first.strip()}")
        time.sleep(0.2)  # the other threads' attach messages follow at once
        client()
    finally:
        proc.send_signal(signal.SIGINT)  # detaches; the traced server goes on
        proc.wait(timeout=10)
    with open(out, errors="replace") as f:
        return parse(f, server_port)
