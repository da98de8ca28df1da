#!/usr/bin/env python3
"""What a RangeStream to a slow reader costs the server: RSS growth while streaming a 1 GiB prefix.

Loads 1M keys × 1 KiB under /registry/pods/ (as kube_bench.py loads), then one client reads the whole
prefix as a KV.RangeStream, sleeping between chunks, on a channel whose HTTP/2 flow-control window stays at
gRPC's 64 KiB default (no BDP probing), so the server cannot push the answer into buffers faster than the
client reads. The server's RSS (its process tree, /proc) is sampled throughout; the figure is the largest
growth over the RSS just before the stream started. fastetcd reads a chunk from its core only when the
previous one was sent, so the growth should stay near one chunk (about --max-request-bytes, 1.5 MiB), far
below the 1 GiB answer; the bound checked is 64 MiB.

    python bench/range_stream_mem.py                       # fastetcd, 1M × 1 KiB, 20 ms between chunks
    python bench/range_stream_mem.py --keys 100000 --servers fastetcd,etcd-3.7
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import FastetcdServer, Server, log, running  # noqa: E402
from kube_bench import (  # noqa: E402
    ETCD37,
    GRPC_OPTS,
    PREFIX,
    RANGE_STREAM,
    Etcd37Server,
    RangeStreamResp,
    ensure_etcd37,
    load,
    prefix_end,
    range_request,
    tree_rss,
)

from fastetcd.testing import tree_memory  # noqa: E402  (compare put src/ on sys.path)

BOUND_MIB = 64
SLOW_OPTS = [*GRPC_OPTS, ("grpc.http2.bdp_probe", 0)]


def anon_rss(root: int) -> int:
    """RssAnon of the process tree: memory the server allocated, without file pages it maps (bbolt's mmap)."""
    return tree_memory(root, "RssAnon")


def slow_stream(server: Server, keys: int, delay: float) -> tuple[int, int, int, int, int, float]:
    """Read the prefix as one RangeStream, sleeping `delay` after each chunk, while sampling the server's
    RSS. Returns (baseline RSS, peak RSS, baseline anonymous RSS, its peak, chunks, seconds)."""
    pid = server.pid
    base, base_anon = tree_rss(pid), anon_rss(pid)
    peak = [base, base_anon]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(pid))
            peak[1] = max(peak[1], anon_rss(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    seen = chunks = 0
    last = None
    try:
        with grpc.insecure_channel(server.endpoint, options=SLOW_OPTS) as ch:
            call = ch.unary_stream(RANGE_STREAM, request_serializer=None, response_deserializer=None)
            for raw in call(range_request(PREFIX, prefix_end(PREFIX)), timeout=3600):
                last = RangeStreamResp.FromString(raw).range_response
                seen += len(last.kvs)
                chunks += 1
                time.sleep(delay)
    finally:
        stop.set()
        sampler.join()
    if last is None or seen != keys or last.count != keys:
        raise RuntimeError(f"{server.name}: stream saw {seen} keys, expected {keys}")
    return base, peak[0], base_anon, peak[1], chunks, time.monotonic() - t0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000, help="keys × 1 KiB under the prefix (default 1M)")
    p.add_argument("--delay", type=float, default=0.02, help="seconds the client sleeps after each chunk")
    p.add_argument("--servers", default="fastetcd", help="fastetcd and/or etcd-3.7 (default fastetcd)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs `-m fastetcd`")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    if set(names) - {"fastetcd", "etcd-3.7"}:
        sys.exit(f"unknown server(s) in {names}")
    failed = False
    with tempfile.TemporaryDirectory(prefix="fastetcd-stream-mem-") as tmpdir:
        for name in names:
            wd = Path(tmpdir) / name
            wd.mkdir()
            if name == "etcd-3.7":
                ensure_etcd37()
                server: Server = Etcd37Server(name, wd)
            else:
                server = FastetcdServer(name, wd, python=args.python)
            with running([server]) as errors:
                if errors:
                    print(f"{name}: {errors[name]}")
                    failed = True
                    continue
                secs = load(server, args.keys, 1024)
                log(f"{name}: loaded {args.keys:,} × 1 KiB in {secs:.1f} s")
                time.sleep(2)  # let the load's tail (group commits, GC) settle before the baseline
                base, peak, base_anon, peak_anon, chunks, took = slow_stream(server, args.keys, args.delay)
                grown = (peak - base) / 2**20
                ok = name != "fastetcd" or grown < BOUND_MIB
                failed |= not ok
                verdict = f" (bound {BOUND_MIB} MiB: {'ok' if ok else 'EXCEEDED'})"
                gib = args.keys * 1024 / 2**30
                print(f"{name}: streamed {args.keys:,} × 1 KiB ({gib:.2f} GiB of values) in {chunks} chunks"
                      f" over {took:.1f} s to a client sleeping {args.delay * 1e3:.0f} ms per chunk;"
                      f" RSS before {base / 2**20:,.0f} MiB, peak growth {grown:.1f} MiB"
                      f" (anonymous memory: {(peak_anon - base_anon) / 2**20:.1f} MiB)"
                      f"{verdict if name == 'fastetcd' else ''}")  # fmt: skip
    if "etcd-3.7" in names:
        print(f"etcd-3.7: {ETCD37}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
