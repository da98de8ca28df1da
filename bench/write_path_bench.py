"""CPU per write on the server's own path, in process: the KV handler, the writer's apply, the log entry,
the response bytes. The store is a null one (its append does nothing) and there is no transport, so the
figure is the Python/Cython work a Put or a Txn costs the event loop thread, free of the shared machine's
noise in throughput figures.

    PYTHONPATH=src python bench/write_path_bench.py            # put and txn-put, median of 5 rounds
    PYTHONPATH=src python bench/write_path_bench.py --profile  # cProfile of the txn-put round

The requests are the bytes etcd's benchmark tool sends (8-byte keys over 100,000, 256-byte values; txn-put
is a Txn with no compare and one put, as ``benchmark txn-put`` sends by default), in batches of 64 as the
writer sees them at 64 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import statistics
import time

from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.header import Header
from fastetcd.server.kv import KVService
from fastetcd.store.base import Recovered

BATCH = 64
ROUNDS = 5
REQUESTS = 20_000


class NullStore:
    gather_window = 0.0

    async def open(self, *, writer: bool = True) -> Recovered:
        return Recovered()

    async def append(self, entries: list[tuple[int, bytes]]) -> None:
        return None

    def append_nowait(self, entries: list[tuple[int, bytes]], on_durable) -> bool:
        # The embedded store's path: the engine hears back from a callback in a later loop turn.
        asyncio.get_running_loop().call_soon(on_durable, None)
        return True

    def size(self) -> int:
        return 0

    def size_in_use(self) -> int:
        return 0

    async def save_snapshot(self, index: int, chunks: object) -> None:
        return None

    async def close(self) -> None:
        return None


def requests(kind: str, n: int) -> list[bytes]:
    rnd = random.Random(1)
    value = b"v" * 256
    out = []
    for _ in range(n):
        key = rnd.randrange(100_000).to_bytes(8, "big")
        put = pb.PutRequest(key=key, value=value)
        if kind == "put":
            out.append(put.SerializeToString())
        else:
            out.append(pb.TxnRequest(success=[pb.RequestOp(request_put=put)]).SerializeToString())
    return out


async def run_round(kv: KVService, kind: str, raws: list[bytes]) -> float:
    """CPU seconds per request for ``raws`` through ``kind``'s handler and the writer."""
    handler = kv.put if kind == "put" else kv.txn
    sm = kv.sm
    t0 = time.process_time()
    for i in range(0, len(raws), BATCH):
        outs = [handler(raw) for raw in raws[i : i + BATCH]]
        await sm._commit_batch()
        await asyncio.sleep(0)  # the answers are encoded from the engine futures' done callbacks
        for o in outs:
            assert o.done() and o.result()
    return (time.process_time() - t0) / len(raws)


async def main(profile: bool) -> None:
    sm = StateMachine(NullStore(), snapshot_count=10**9)
    await sm.start(writer=False)
    sm.leading = True  # the writer task is not started: run_round drives the batches itself
    kv = KVService(sm, Header(1, 2), max_request_bytes=1536 * 1024, max_txn_ops=128)
    for kind in ("put", "txn-put"):
        raws = requests(kind, REQUESTS)
        await run_round(kv, kind, raws[:2000])  # warm up
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            await run_round(kv, kind, raws)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        per_op = [await run_round(kv, kind, raws) for _ in range(ROUNDS)]
        print(f"{kind:8s} {statistics.median(per_op) * 1e6:6.2f} µs/op  (rounds: "
              + ", ".join(f"{x * 1e6:.2f}" for x in per_op) + ")")
    sm._sweep and sm._sweep.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of the txn-put round")
    asyncio.run(main(ap.parse_args().profile))
