"""Failover time of a three-node cluster over one Cosmos container (the Cosmos test server): kill -9 the
leader, then time until a Put through one of the survivors is acknowledged. fastetcd's default leadership
lease (5 s) unless --lease says otherwise; the bound is lease + poll (a tenth of it) after the leader's
last renewal, plus the catch-up, and the kill comes up to one renewal interval after that renewal.

    python bench/ha_failover.py [--runs 3] [--lease 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import cosmos_fixture  # noqa: E402
import grpc  # noqa: E402
import ha_cluster  # noqa: E402

from fastetcd.proto import rpc_pb2  # noqa: E402
from fastetcd.testing import channel, kv_stub  # noqa: E402


def writes_resume(cluster: ha_cluster.HaCluster, survivors: list[int], t0: float) -> float:
    while time.monotonic() - t0 < 60:
        for i in survivors:
            try:
                with channel(cluster.nodes[i].endpoint) as ch:
                    kv_stub(ch).Put(rpc_pb2.PutRequest(key=b"/probe", value=b"x"), timeout=1)
                return time.monotonic() - t0
            except grpc.RpcError:
                pass
    raise RuntimeError("writes did not resume within 60 s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lease", type=float, default=5.0)
    args = p.parse_args()
    ha_cluster.LEASE_S = args.lease
    took = []
    root = Path(tempfile.mkdtemp(prefix="fastetcd-failover-"))
    with cosmos_fixture.cosmos_server_running(root) as cosmos:
        for run in range(args.runs):
            cluster = ha_cluster.HaCluster(cosmos, root / f"run{run}")
            try:
                cluster.start()
                leader = cluster.leader()
                time.sleep(2)
                t0 = time.monotonic()
                cluster.kill(leader)
                took.append(writes_resume(cluster, [i for i in range(3) if i != leader], t0))
                print(f"run {run + 1}/{args.runs}: writes resumed {took[-1]:.2f} s after kill -9 of the "
                      "leader", flush=True)
            finally:
                cluster.close()
    print(f"median {statistics.median(took):.2f} s, max {max(took):.2f} s (lease {args.lease:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
