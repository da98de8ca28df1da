#!/usr/bin/env python3
"""T9 — Cosmos DB requests per acknowledged write (group commit), and write throughput on the Cosmos store.

fastetcd runs with `--store cosmos` against the project's Cosmos test server (tests/cosmos_server: Node,
in memory, on loopback); etcd's own Go `benchmark put` drives it at each client count. Around every run the
script reads the test server's request counters (`/_stats`, reset before the run), so

    Cosmos requests per write = Cosmos requests during the run / writes acknowledged in it

counts everything the store sends while the load runs (batches, chunk writes, reads, queries). T9 wants
≤ 0.1 at 64 clients, i.e. ≥ 10 writes per Cosmos request on average.

The test server answers in well under a millisecond, far faster than a real Cosmos account (a few ms
within a region), and group commit batches grow with the store's latency. `--latency-ms N` makes the test
server delay every request by N ms (its `delay` fault) to show the figures under a more realistic latency.
Throughput here is not Cosmos's: it is what one fastetcd process achieves when the store is cheap.

    python bench/cosmos_bench.py                       # 1, 16, 64 clients, 3 runs of ~5 s each
    python bench/cosmos_bench.py --quick               # 1 run of ~1 s each
    python bench/cosmos_bench.py --latency-ms 5 --markdown --json /tmp/cosmos-bench.json

Like bench/compare.py (whose server, tool and CPU plumbing this reuses): medians of --repeat runs; server
CPU from /proc (fastetcd's process tree, and the Cosmos test server's), the tool's CPU from its rusage.
Exit status 1 if a run failed or T9 is missed at 64 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compare import (
    REPO,
    SERVER_PYTHONPATH,
    FastetcdServer,
    Workload,
    calibrate_total,
    default_conns,
    ensure_tool,
    kv_put,
    log,
    machine_notes,
    note_other_cpu,
    parse_bench_args,
    print_markdown,
    run_tool,
    tree_cpu_seconds,
)

from fastetcd.testing import CosmosTarget, ServerProcess, start_fastetcd  # noqa: E402  (path: compare)

sys.path.insert(0, str(REPO / "tests"))
from cosmos_fixture import CosmosServer, start_cosmos_server  # noqa: E402

T9_GOAL = 0.1  # Cosmos requests per acknowledged write at 64 clients
T9_CLIENTS = 64
DATABASE = "fastetcd-bench"


@dataclass
class CosmosFastetcd(FastetcdServer):
    """fastetcd on the Cosmos store; the key travels in the environment, never on the command line."""

    cosmos_endpoint: str = ""
    cosmos_key: str = ""
    container: str = "bench"

    def launch(self, timeout: float) -> ServerProcess:
        target = CosmosTarget(self.cosmos_endpoint, self.cosmos_key, DATABASE)
        return start_fastetcd(self.workdir, self.extra_args, cosmos=target, container=self.container,
                              python=self.python, pythonpath=SERVER_PYTHONPATH, timeout=timeout)


@dataclass
class Sample:
    clients: int
    writes: int  # acknowledged
    errors: dict[str, int]
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int  # Cosmos requests during the run
    by_kind: dict[str, int]
    batch_operations: int
    server_cpu: float  # fastetcd
    cosmos_cpu: float  # the test server
    client_cpu: float
    other_cores: float

    @property
    def per_write(self) -> float:
        return self.requests / self.writes if self.writes else float("inf")

    @property
    def writes_per_batch(self) -> float:
        batches = self.by_kind.get("batch", 0)
        return self.writes / batches if batches else 0.0


@dataclass
class Row:
    clients: int
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    def med(self, attr: str) -> float | None:
        vals = [getattr(s, attr) for s in self.samples]
        return statistics.median(vals) if vals else None


def run_once(bench: Path, server: CosmosFastetcd, cosmos: CosmosServer, wl: Workload, total: int,
             seconds: float) -> Sample:
    cosmos.reset_stats()
    cosmos_cpu0 = tree_cpu_seconds(cosmos.pid)
    r = run_tool(bench, server, wl, total, timeout=max(120.0, seconds * 20))
    cosmos_cpu = tree_cpu_seconds(cosmos.pid) - cosmos_cpu0
    stats = cosmos.stats()
    writes = r.total - sum(r.errors.values())
    return Sample(
        clients=wl.clients,
        writes=writes,
        errors=r.errors,
        rps=r.rps,
        p50_ms=r.percentiles.get("50", 0.0) * 1e3,
        p99_ms=r.percentiles.get("99", 0.0) * 1e3,
        requests=int(stats["total"]),
        by_kind={k: int(v) for k, v in stats["by_kind"].items()},
        batch_operations=int(stats["batch_operations"]),
        server_cpu=r.server_cpu,
        cosmos_cpu=cosmos_cpu,
        client_cpu=r.client_cpu,
        other_cores=r.other_cores,
    )


def measure(bench: Path, server: CosmosFastetcd, cosmos: CosmosServer, clients: Sequence[int], repeat: int,
            seconds: float) -> list[Row]:
    rows = [Row(c) for c in clients]
    for row in rows:
        wl = Workload("put", row.clients, default_conns(row.clients))
        try:
            total = calibrate_total(bench, server, wl, seconds)
            for i in range(repeat):
                s = run_once(bench, server, cosmos, wl, total, seconds)
                row.samples.append(s)
                errs = sum(s.errors.values())
                log(f"  put/{row.clients:<3d} run {i + 1}/{repeat}: {s.rps:8.0f} writes/s  "
                    f"{s.per_write:.4f} Cosmos requests/write ({s.requests} for {s.writes}; "
                    f"{s.writes_per_batch:.1f} writes/batch)  p50 {s.p50_ms:.2f} ms  p99 {s.p99_ms:.2f} ms"
                    f"  srv {s.server_cpu / max(s.writes, 1) * 1e6:.0f} µs/write"
                    + (f"  ERRORS {errs}: {next(iter(s.errors))}" if errs else ""))
        except Exception as exc:  # keep the other client counts' figures
            row.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"  put/{row.clients} FAILED: {exc}")
    return rows


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    head = ["clients", "writes/s", "p50 / p99 ms", "Cosmos requests/write", "writes per batch",
            "Cosmos requests (median run): by kind", "fastetcd µs/write", "Cosmos server µs/write",
            "client µs/write", "errors"]
    out = []
    for row in rows:
        if not row.samples:
            out.append([str(row.clients), "failed", "", "", "", row.error or "", "", "", "", ""])
            continue
        mid = sorted(row.samples, key=lambda s: s.per_write)[len(row.samples) // 2]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(mid.by_kind.items(), key=lambda kv: -kv[1]) if v)

        def per_write(attr: str, row: Row = row) -> float:
            return statistics.median(getattr(s, attr) / max(s.writes, 1) * 1e6 for s in row.samples)

        errors = sum(sum(s.errors.values()) for s in row.samples)
        out.append([
            str(row.clients),
            _f(row.med("rps"), ",.0f"),
            f"{_f(row.med('p50_ms'), '.2f')} / {_f(row.med('p99_ms'), '.2f')}",
            _f(row.med("per_write"), ".4f"),
            _f(row.med("writes_per_batch"), ".1f"),
            f"{mid.requests:,} for {mid.writes:,} writes: {kinds}",
            f"{per_write('server_cpu'):.0f}",
            f"{per_write('cosmos_cpu'):.0f}",
            f"{per_write('client_cpu'):.0f}",
            str(errors),
        ])
    return head, out


def t9_verdict(rows: list[Row]) -> tuple[bool, str]:
    row = next((r for r in rows if r.clients == T9_CLIENTS), None)
    if row is None or not row.samples:
        return False, f"T9 not measured ({T9_CLIENTS} clients {'missing' if row is None else 'failed'})"
    v = row.med("per_write")
    assert v is not None
    ok = v <= T9_GOAL
    return ok, f"T9: {v:.4f} Cosmos requests per write at {T9_CLIENTS} clients (goal ≤ {T9_GOAL}): " + (
        "met" if ok else "MISSED")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,16,64", help="comma list of client counts (default 1,16,64)")
    p.add_argument("--repeat", type=int, default=3, help="runs per client count; medians reported")
    p.add_argument("--seconds", type=float, default=5.0, help="target length of one run (default 5)")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="delay every Cosmos request by this much in the test server (default 0)")
    return parse_bench_args(p, argv, quick_help="smoke run: 1 repeat of ~1 s each",
                            quick={"repeat": 1, "seconds": 1.0}, servers=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    bench = ensure_tool()
    notes = machine_notes()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastetcd-cosmos-bench-") as tmp:
        cosmos = start_cosmos_server(Path(tmp) / "cosmos")
        server = CosmosFastetcd("fastetcd", Path(tmp), python=args.python, extra_args=args.fastetcd_arg,
                                cosmos_endpoint=cosmos.endpoint, cosmos_key=cosmos.key,
                                container=f"bench-{os.getpid()}")
        try:
            if args.latency_ms > 0:
                cosmos.fault("delay", ms=args.latency_ms, kind="all")
            server.start()
            log(f"fastetcd --store cosmos serving on {server.endpoint}; Cosmos test server {cosmos.endpoint}")
            kv_put(server.endpoint, b"benchkey", b"x" * 256)
            rows = measure(bench, server, cosmos, clients, args.repeat, args.seconds)
        finally:
            server.stop()
            cosmos.stop()
    elapsed = time.monotonic() - started
    notes["wall time"] = f"{elapsed:.0f} s"
    note_other_cpu(notes, [s.other_cores for r in rows for s in r.samples])
    notes["settings"] = (
        "etcd benchmark put, 8-byte keys over 100,000 random keys, 256-byte values, "
        "conns = clients/4 (≤ 8), "
        f"median of {args.repeat} × ~{args.seconds:g} s runs; Cosmos test server (tests/cosmos_server) on "
        f"loopback, added latency {args.latency_ms:g} ms per request"
    )
    ok, verdict = t9_verdict(rows)
    failed = [f"{r.clients} clients: {r.error}" for r in rows if r.error]
    head, body = table(rows)
    command = "python bench/cosmos_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps({
            "notes": notes,
            "rows": [{"clients": r.clients, "error": r.error,
                      "samples": [{**asdict(s), "per_write": s.per_write} for s in r.samples]} for r in rows],
        }, indent=1))
    if args.markdown:
        print_markdown(head, body, notes, command.strip(), failed)
        print(f"\n{verdict}")
    else:
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        for r in body:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        print(verdict)
        for f in failed:
            print(f"not measured: {f}")
        log(f"done in {elapsed:.0f} s")
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
