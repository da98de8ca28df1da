"""kill -9 while 16 clients write: after a restart on the same data dir every acknowledged write is there
with its acknowledged revision, nothing that was never sent appears, and revisions have no gaps.

fastetcd only by default: etcd 3.5.1 itself can lose acknowledged writes here (etcd #13766, #14370).
Every Put touches a distinct key, so the whole history is visible in one Range: revision r (2..N) must
be the mod_revision of exactly one key.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
from servers import ServerFactory

from fastetcd.proto import rpc_pb2
from fastetcd.testing import ServerProcess, kv_stub

WRITERS = 16
WRITE_SECONDS = 2.0
PREFIX = b"crash/"


@dataclass
class WriterLog:
    sent: list[bytes] = field(default_factory=list)
    acked: list[tuple[bytes, bytes, int]] = field(default_factory=list)  # (key, value, header.revision)
    errors: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, error)


def _writer(endpoint: str, round_no: int, writer: int, stop: threading.Event, log: WriterLog) -> None:
    with grpc.insecure_channel(endpoint) as channel:
        stub = kv_stub(channel)
        i = 0
        while not stop.is_set():
            key = PREFIX + f"{round_no}/{writer:02d}/{i:08d}".encode()
            value = f"{writer}:{i}".encode()  # increasing per writer
            log.sent.append(key)  # before sending: an unacknowledged write may still land
            try:
                resp = stub.Put(rpc_pb2.PutRequest(key=key, value=value), timeout=10)
            except grpc.RpcError as e:
                log.errors.append((time.monotonic(), f"{e.code().name}: {e.details()}"))
                return
            log.acked.append((key, value, resp.header.revision))
            i += 1


def _write_then_kill(server: ServerProcess, round_no: int) -> list[WriterLog]:
    stop = threading.Event()
    logs = [WriterLog() for _ in range(WRITERS)]
    threads = [
        threading.Thread(target=_writer, args=(server.endpoint, round_no, w, stop, logs[w]), daemon=True)
        for w in range(WRITERS)
    ]
    for t in threads:
        t.start()
    time.sleep(WRITE_SECONDS)
    killed_at = time.monotonic()
    server.kill()  # SIGKILL to the server's process group, mid-write
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "writers hung after the server was killed"
    early = [(w, err) for w, log in enumerate(logs) for ts, err in log.errors if ts < killed_at]
    assert not early, f"writes failed before the kill: {early[:5]}"
    acked = sum(len(log.acked) for log in logs)
    assert acked >= WRITERS, f"only {acked} writes were acknowledged in {WRITE_SECONDS}s"
    return logs


def _check_recovered(server: ServerProcess, logs: list[WriterLog]) -> int:
    """Verify the restarted server's state against everything written so far; returns its revision."""
    with grpc.insecure_channel(server.endpoint) as channel:
        stub = kv_stub(channel)
        resp = stub.Range(rpc_pb2.RangeRequest(key=PREFIX, range_end=b"crash0"), timeout=30)
    found = {kv.key: kv for kv in resp.kvs}
    head = resp.header.revision

    lost = []
    for log in logs:
        for key, value, rev in log.acked:
            kv = found.get(key)
            if kv is None or kv.value != value or kv.mod_revision != rev:
                lost.append((key, value, rev, None if kv is None else (kv.value, kv.mod_revision)))
    assert not lost, f"{len(lost)} acknowledged writes lost or changed, e.g. {lost[:5]}"

    sent = {key for log in logs for key in log.sent}
    invented = [key for key in found if key not in sent]
    assert not invented, f"keys that were never sent: {invented[:5]}"

    # Every key is written once, so each generation is that single put.
    odd = [(kv.key, kv.create_revision, kv.mod_revision, kv.version) for kv in resp.kvs
           if kv.create_revision != kv.mod_revision or kv.version != 1]
    assert not odd, f"keys with more than one write: {odd[:5]}"

    revs = sorted(kv.mod_revision for kv in resp.kvs)
    expected = list(range(2, head + 1))
    if revs != expected:
        missing = sorted(set(expected) - set(revs))
        dup = sorted({r for r in revs if revs.count(r) > 1})
        extra = sorted(set(revs) - set(expected))
        raise AssertionError(
            f"revisions are not exactly 2..{head}: missing {missing[:10]} ({len(missing)}), "
            f"repeated {dup[:10]}, beyond the header revision {extra[:10]}"
        )
    assert resp.count == head - 1
    return head


def test_acknowledged_writes_survive_kill_9(server_factory: ServerFactory, subject_kind: str) -> None:
    # The oracle normally runs without fsync; as a subject here it must be its durable self.
    kwargs = {"fsync": True} if subject_kind == "etcd" else {}
    server = server_factory(subject_kind, "crash", **kwargs)
    logs: list[WriterLog] = []
    # Two rounds: recovery must also hold for a store that was itself recovered from a crash.
    for round_no in range(2):
        logs += _write_then_kill(server, round_no)
        server = server_factory(subject_kind, "crash", **kwargs)  # same data dir, new port
        head = _check_recovered(server, logs)

    # And the recovered server keeps numbering where it stopped.
    with grpc.insecure_channel(server.endpoint) as channel:
        stub = kv_stub(channel)
        resp = stub.Put(rpc_pb2.PutRequest(key=b"after-crash", value=b"ok"), timeout=30)
        assert resp.header.revision == head + 1
        got = stub.Range(rpc_pb2.RangeRequest(key=b"after-crash"), timeout=30)
        assert [(kv.value, kv.mod_revision) for kv in got.kvs] == [(b"ok", head + 1)]
