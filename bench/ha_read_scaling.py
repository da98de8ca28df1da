"""Read scaling over several local nodes: serializable Range through three fastetcd processes sharing one
--data-dir (``--ha on``: one leader, two followers) against one fastetcd, and etcd 3.5.1 for reference.

etcd's benchmark tool spreads its connections over the endpoints it is given; each node answers
serializable reads from its own memory, so reads spread over processes (and cores). This machine has two
cores, which bounds the throughput; the figure to read is server CPU per read (all three processes
summed), which says what a read costs wherever it is served.

    python bench/ha_read_scaling.py --markdown [--clients 64] [--repeat 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402
from compare import (  # noqa: E402
    PROGRESS,
    RANGE_KEY,
    SERVER_PYTHONPATH,
    VAL_SIZE,
    EtcdServer,
    FastetcdServer,
    Server,
    Workload,
    default_conns,
    kv_put,
    machine_notes,
    print_markdown,
    print_text,
    table_rows,
    tree_cpu_seconds,
)

from fastetcd.testing import ServerProcess, free_port, start_fastetcd  # noqa: E402

NATIVE = ("--transport", "native")


@dataclass
class LocalCluster(Server):
    """``size`` fastetcd processes over one data dir; its endpoint is all of theirs, comma-separated."""

    size: int = 3
    procs: list[ServerProcess] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return ",".join(p.endpoint for p in self.procs)

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def start(self, timeout: float = 60.0) -> None:
        data = self.workdir / "shared"
        self.procs = [
            start_fastetcd(self.workdir / f"n{i}", [*NATIVE, "--ha", "on", "--name", f"n{i}", "--data-dir",
                                                    str(data), "--log-level", "warn"],
                           port=free_port(), explicit_data_dir=False, pythonpath=SERVER_PYTHONPATH,
                           timeout=timeout)
            for i in range(self.size)
        ]

    def stop(self) -> None:
        for p in self.procs:
            p.stop(timeout=15)

    def alive(self) -> bool:
        return bool(self.procs) and all(p.alive() for p in self.procs)

    def cpu_seconds(self) -> float:
        return sum(tree_cpu_seconds(p.pid) for p in self.procs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    bench = compare.ensure_tool()
    wl = Workload("range-s", args.clients, default_conns(args.clients))
    started = time.monotonic()
    PROGRESS.start()
    notes = machine_notes()
    with tempfile.TemporaryDirectory(prefix="fastetcd-ha-bench-") as tmp:
        servers: list[Server] = [
            EtcdServer("etcd", Path(tmp) / "etcd"),
            FastetcdServer("fastetcd", Path(tmp) / "one", extra_args=NATIVE),
            LocalCluster("fastetcd×3", Path(tmp) / "three"),
        ]
        try:
            for s in servers:
                s.start()
                # Written through the first endpoint; a follower forwards it to the leader.
                kv_put(s.endpoint.split(",")[0], RANGE_KEY, os.urandom(VAL_SIZE))
            time.sleep(1)  # the followers apply it (they tail the leader's log)
            results = compare.compare(servers, [wl], args.repeat, args.seconds, bench)
        finally:
            for s in servers:
                s.stop()
    notes["wall time"] = f"{time.monotonic() - started:.0f} s"
    notes["settings"] = (
        f"etcd benchmark range {RANGE_KEY.decode()} --consistency=s, {args.clients} clients over "
        f"{wl.conns} connections spread over the endpoints; fastetcd×3 = three processes with --ha on "
        f"over one --data-dir (server CPU summed over the three); native transport; median of "
        f"{args.repeat} runs"
    )
    names = [s.name for s in servers]
    head, rows = table_rows(results, names)
    command = "python bench/ha_read_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.markdown:
        print_markdown(head, rows, notes, command.strip(), [])
    else:
        print_text(head, rows)
    one, three = results[wl]["fastetcd"], results[wl]["fastetcd×3"]
    if one.runs and three.runs:
        rps = three.median("rps") / one.median("rps")
        cpu = three.median("server_us_per_op") / one.median("server_us_per_op")
        print(f"\nthree nodes / one node: throughput {rps:.2f}, server CPU per read {cpu:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
