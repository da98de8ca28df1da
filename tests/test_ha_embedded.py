"""Several fastetcd processes over one --data-dir (``--ha on``): one leader writes SQLite, the others follow
its committed log from the same file, serve reads and watches themselves and forward writes.

The same machinery as on Cosmos (engine/replica.py), with leadership as a flock the kernel drops when its
holder dies, so a kill -9 is followed by a takeover within the followers' poll, not a lease.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from linearizability.lincheck import LINEARIZABLE, check_history
from linearizability.recorder import Recorder

from fastetcd.proto import rpc_pb2
from fastetcd.testing import ServerProcess, channel, free_port, kv_stub, maintenance_stub, start_fastetcd


class LocalCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.data_dir = root / "shared"
        self.ports = [free_port() for _ in range(size)]
        self.procs: list[ServerProcess | None] = [None] * size

    def start(self, i: int, *, wait: bool = True) -> ServerProcess:
        self.procs[i] = start_fastetcd(
            self.root / f"n{i}", ["--ha", "on", "--ha-lease", "1s", "--name", f"n{i}",
                                  "--data-dir", str(self.data_dir)],
            port=self.ports[i], explicit_data_dir=False, wait=wait)
        return self.procs[i]

    def endpoint(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def leader(self, among: list[int], timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = {}
                for i in among:
                    with channel(self.endpoint(i)) as ch:
                        st[i] = maintenance_stub(ch).Status(rpc_pb2.StatusRequest(), timeout=2)
                leaders = {s.leader for s in st.values()}
                if len(leaders) == 1 and 0 not in leaders:
                    return next(i for i, s in st.items() if s.header.member_id == s.leader)
            except (grpc.RpcError, StopIteration):
                pass
            time.sleep(0.1)
        raise AssertionError("no agreed leader")

    def close(self) -> None:
        for p in self.procs:
            if p is not None and p.alive():
                p.stop()


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path)
    try:
        c.start(0)  # the first one creates the data dir and leads
        c.start(1, wait=False)
        c.start(2)
        yield c
    finally:
        c.close()


def _put(endpoint: str, key: bytes, value: bytes) -> int:
    with channel(endpoint) as ch:
        return kv_stub(ch).Put(rpc_pb2.PutRequest(key=key, value=value), timeout=10).header.revision


def _get(endpoint: str, key: bytes, serializable: bool = False) -> rpc_pb2.RangeResponse:
    with channel(endpoint) as ch:
        return kv_stub(ch).Range(rpc_pb2.RangeRequest(key=key, serializable=serializable), timeout=10)


def test_processes_over_one_data_dir_serve_one_history(local_cluster: LocalCluster) -> None:
    c = local_cluster
    leader = c.leader([0, 1, 2])
    for i in range(30):
        rev = _put(c.endpoint(i % 3), f"/k/{i}".encode(), f"v{i}".encode())
        for j in range(3):
            got = _get(c.endpoint(j), f"/k/{i}".encode())
            assert [kv.value for kv in got.kvs] == [f"v{i}".encode()] and got.header.revision >= rev
    survivors = [i for i in range(3) if i != leader]
    # The leader last: the recorder takes its initial and final reads from the first endpoint.
    with Recorder([c.endpoint(i) for i in [*survivors, leader]], clients=9) as rec:
        time.sleep(2)
        c.procs[leader].kill()  # the flock goes with the process: a follower takes over at once
        time.sleep(3)
    new_leader = c.leader(survivors)
    assert new_leader != leader
    verdict = check_history(rec.history, c.root)
    assert verdict.returncode == LINEARIZABLE, verdict.describe()
    assert _get(c.endpoint(new_leader), b"/k/29").kvs[0].value == b"v29"
    # The killed node comes back as a follower and catches up.
    c.start(leader)
    rev = _put(c.endpoint(new_leader), b"/after", b"1")
    assert _get(c.endpoint(leader), b"/after").header.revision >= rev
