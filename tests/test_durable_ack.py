"""A put is answered only once the fdatasync that makes it durable has returned, seen from outside (strace).

One client puts 100 keys one at a time; strace, attached to every thread of the server, records the log
fdatasyncs and the gRPC responses written to the client (fastetcd.testing.ack_order). A response written
while the log's fdatasync is still running acknowledges a write that a power cut could still take away.

etcd 3.5.1 is the positive control: in a one-member cluster it applies and answers alongside its WAL save
(etcd-io/etcd#14370, fixed in 3.5.5), so the same detector must see it answer early, which shows the
detector can see an early answer at all; etcd 3.7.3, the negative one, waits and must show none. fastetcd
answers from the commit log's durable callback and must never. This is why etcd 3.5.1's single-client put
latency (T6 in bench/RESULTS.md) leaves out part of its fdatasync, and fastetcd's cannot.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from etcd37 import etcd37_binary
from servers import ServerFactory

from fastetcd.testing import ServerProcess
from fastetcd.testing.ack_order import AckOrder, lone_puts, parse, trace

PUTS = 100
PLAIN = {"tls": None, "client_tls": None}  # strace reads the HTTP/2 frames: plain text even under --tls


def _trace(server: ServerProcess, tmp_path: Path) -> AckOrder:
    assert shutil.which("strace"), "strace is needed (Debian package strace; .ci/run installs it)"
    out = tmp_path / f"{server.kind}.strace"
    return trace(server.pid, server.port, out, lone_puts(server.endpoint, PUTS))


def test_fastetcd_answers_a_put_only_once_its_log_fdatasync_returned(server_factory: ServerFactory,
                                                                      tmp_path: Path) -> None:
    # The embedded store even in the Cosmos pass: its commit log is the file whose sync is watched.
    server = server_factory("fastetcd", "fastetcd", ["--store", "embedded"], **PLAIN)
    order = _trace(server, tmp_path)
    assert order.answers >= PUTS, order
    assert order.syncs >= PUTS, order  # one lone put at a time: one fdatasync each
    assert order.early == 0, order


@pytest.mark.parametrize("version, early", [("3.5.1", True), ("3.7.3", False)])
def test_the_detector_on_etcd_sees_3_5_1_answer_before_its_wal_fdatasync_returned_and_3_7_3_not(
        server_factory: ServerFactory, tmp_path: Path, version: str, early: bool) -> None:
    binary = str(etcd37_binary()) if version == "3.7.3" else None
    server = server_factory("etcd", f"etcd-{version}", fsync=True, binary=binary, **PLAIN)
    order = _trace(server, tmp_path)
    assert order.answers >= PUTS, order
    # etcd 3.5.1 hands a Ready to its apply loop before it starts the WAL save, so the last put can be
    # answered, and the trace ended, before that put's fdatasync has even begun (seen in CI: 99 of 100).
    assert order.syncs >= PUTS - early, order
    if early:
        # 41 to 67 of 100 in runs here; one is enough to show the detector sees what it is meant to.
        assert order.early >= 1, order
    else:
        assert order.early == 0, order


def _hex(data: bytes) -> str:
    """As strace -xx prints bytes (data and paths alike)."""
    return "".join(f"\\x{b:02x}" for b in data)


TO_CLIENT = "TCP:[127.0.0.1:2379->127.0.0.1:5000]"
RESPONSE = _hex(b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x88")  # HEADERS on stream 1 (":status 200")
SETTINGS_ACK = _hex(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")  # on the connection, stream 0


@pytest.mark.parametrize("line, answers", [
    (f'7 write(16<{TO_CLIENT}>, "{RESPONSE}", 10) = 10', 1),
    (f'7 write(16<{TO_CLIENT}>, "{SETTINGS_ACK}{RESPONSE}", 19) = 19', 1),  # the response after a frame
    (f'7 write(16<{TO_CLIENT}>, "{SETTINGS_ACK}", 9) = 9', 0),
    # A socket whose local port is not the server's (a connection it made itself): not counted.
    (f'7 write(16<TCP:[127.0.0.1:5000->127.0.0.1:2379]>, "{RESPONSE}", 10) = 10', 0),
    # grpcio's sendmsg on a dual-stack socket, the frame split over two iovecs.
    ('7 sendmsg(24<TCPv6:[[::ffff:127.0.0.1]:2379->[::ffff:127.0.0.1]:5000]>, {msg_iov=['
     f'{{iov_base="{RESPONSE[:16]}", iov_len=4}}, {{iov_base="{RESPONSE[16:]}", iov_len=6}}]}}, 0) = 10', 1),
])
def test_parse_counts_responses_on_the_servers_client_sockets(line: str, answers: int) -> None:
    assert parse([line], 2379).answers == answers


def test_parse_calls_an_answer_early_only_inside_an_unfinished_log_fdatasync() -> None:
    wal, db = _hex(b"/d/member/wal/0.wal"), _hex(b"/d/member/snap/db")
    answer = f'9 write(16<{TO_CLIENT}>, "{RESPONSE}", 10) = 10'
    lines = [
        f"4 fdatasync(11<{wal}> <unfinished ...>", answer,  # early
        "4 <... fdatasync resumed>) = 0", answer,           # after: fine
        f"4 fdatasync(11<{wal}>) = 0", answer,              # printed whole: nothing ran meanwhile
        f"4 fdatasync(9<{db}> <unfinished ...>", answer,    # not the log: fine
    ]
    assert parse(lines, 2379) == AckOrder(answers=4, early=1, syncs=2)
