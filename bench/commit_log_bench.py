"""A lone durable append's latency: the commit log awaited from uvloop against the same pwrite + fdatasync
done inline, alternating round by round in one file, so that the difference is the hand-off (the writer
thread's wake-up, the eventfd back to the loop, the callback) and not the disk's mood.

    python bench/commit_log_bench.py                 # 3 rounds × 2,000 appends of 300 bytes each way
    python bench/commit_log_bench.py --dir /some/fs  # the file on another file system (default: bench/.bin)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from fastetcd.store import commit_log
from fastetcd.store.commit_log import CommitLog

VALUE = b"x" * 270  # + the 28-byte record head ≈ a 256-byte put's log entry


async def rounds(path: str, n: int, count: int) -> tuple[list[float], list[float]]:
    loop = asyncio.get_running_loop()
    log = CommitLog(path, 1)
    fd = os.open(path, os.O_RDWR)
    via_log: list[float] = []
    inline: list[float] = []
    try:
        for r in range(n):
            log.restart(r + 1)
            lat = []
            for i in range(count):
                data = log.encode([(i + 1, VALUE)])
                durable = loop.create_future()
                t = time.perf_counter()
                log.append(data, durable.set_result)
                await durable
                lat.append(time.perf_counter() - t)
            via_log.append(statistics.median(lat))
            lat = []
            base = commit_log.CAPACITY // 2  # the same file, away from what the log just wrote
            for i in range(count):
                t = time.perf_counter()
                os.pwrite(fd, data, base + i * len(data))
                os.fdatasync(fd)
                lat.append(time.perf_counter() - t)
            inline.append(statistics.median(lat))
            print(f"round {r + 1}/{n}: commit log p50 {via_log[-1] * 1e6:.0f} µs, "
                  f"inline pwrite + fdatasync p50 {inline[-1] * 1e6:.0f} µs", flush=True)
    finally:
        os.close(fd)
        log.close()
    return via_log, inline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--dir", default=str(Path(__file__).parent / ".bin"))
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, commit_log.LOG_FILE)
        commit_log.create(path)
        via_log, inline = uvloop.run(rounds(path, args.rounds, args.count))
    print(f"median of {args.rounds} rounds: commit log p50 {statistics.median(via_log) * 1e6:.0f} µs, "
          f"inline p50 {statistics.median(inline) * 1e6:.0f} µs, hand-off "
          f"{(statistics.median(via_log) - statistics.median(inline)) * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
