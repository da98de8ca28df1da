#!/usr/bin/env python3
"""T4 — watch fan-out, and lease churn: fastetcd vs real etcd 3.5 under the project's Go driver.

    fanout       1,000 watchers on one prefix (10 streams × 100 watches over 10 connections) while an
                 open-loop writer puts at 1k/s for --seconds: delivered events/s and the latency from the
                 put's acknowledgement to the event's receipt (the put's sequence number rides in its value).
    fanout-max   the same watchers, --max-puts puts as fast as 16 putters go: saturation events/s.
    lease-churn  16 clients looping LeaseGrant → Put(key, lease) → LeaseRevoke: loops/s (3 RPCs each).

The load generator is bench/loadgen (Go, etcd's own client API packages), built into bench/.bin/loadgen on
first use. Not etcd's tools/benchmark: in v3.5 its `watch` watches single keys, not a prefix, and times
only the hand-off inside the client; `watch-latency` puts in lock-step with every watcher's receipt; and
it has no lease churn. A Python client would be the bottleneck: etcd delivers ~1M events/s here.

Like bench/compare.py (whose server and CPU plumbing this reuses): both servers run with fresh data dirs
and fsync on, only one is under load at a time, runs alternate server by server, medians of --repeat runs;
server CPU from /proc (process tree), driver CPU from its rusage, both per event / per loop.

    python bench/watch_bench.py                  # fanout + lease-churn, 3 repeats (~4 min)
    python bench/watch_bench.py --quick          # 1 short repeat of each (~1 min)
    python bench/watch_bench.py --only fanout --seconds 10 --markdown
    python bench/watch_bench.py --servers etcd   # one side only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compare import (
    PROGRESS,
    REPO,
    Server,
    children_cpu_seconds,
    log,
    machine_busy_seconds,
    machine_notes,
    make_servers,
    note_other_cpu,
    parse_bench_args,
    print_markdown,
    running,
    write_outputs,
)

LOADGEN_SRC = REPO / "bench" / "loadgen"
LOADGEN_BIN = REPO / "bench" / ".bin" / "loadgen"
WORKLOADS = ("fanout", "fanout-max", "lease-churn")
DEFAULT_WORKLOADS = ("fanout", "lease-churn")


def ensure_loadgen() -> Path:
    """Build bench/.bin/loadgen if it is missing or older than its source (~30 s the first time)."""
    sources = [*LOADGEN_SRC.glob("*.go"), LOADGEN_SRC / "go.mod", LOADGEN_SRC / "go.sum"]
    newest = max(p.stat().st_mtime for p in sources)
    if LOADGEN_BIN.exists() and LOADGEN_BIN.stat().st_mtime >= newest:
        return LOADGEN_BIN
    log(f"building {LOADGEN_BIN} from {LOADGEN_SRC}")
    LOADGEN_BIN.parent.mkdir(parents=True, exist_ok=True)
    # Never let a newer Go fetch another toolchain; -mod=mod lets a missing go.sum line resolve.
    env = dict(os.environ, GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="-mod=mod")
    subprocess.run(["go", "build", "-trimpath", "-o", str(LOADGEN_BIN), "."], cwd=LOADGEN_SRC, env=env,
                   check=True, stdout=sys.stderr)
    return LOADGEN_BIN


@dataclass
class Settings:
    seconds: float
    put_rate: float
    streams: int
    watch_per_stream: int
    conns: int
    drain: float
    max_puts: int
    churn_clients: int
    val_size: int = 256

    def loadgen_args(self, op: str, endpoint: str, short: bool = False) -> list[str]:
        secs = min(self.seconds, 1.0) if short else self.seconds
        drain = min(self.drain, 3.0) if short else self.drain
        watch = [f"-streams={self.streams}", f"-watch-per-stream={self.watch_per_stream}",
                 f"-conns={self.conns}", f"-val-size={self.val_size}", f"-drain-timeout={drain}s"]
        if op == "fanout":
            return ["watch-fanout", f"-endpoint={endpoint}", *watch, f"-put-rate={self.put_rate:g}",
                    f"-seconds={secs:g}", "-putters=8"]
        if op == "fanout-max":
            puts = max(100, self.max_puts // 5) if short else self.max_puts
            return ["watch-fanout", f"-endpoint={endpoint}", *watch, "-put-rate=0", f"-puts={puts}",
                    "-putters=16"]
        if op == "lease-churn":
            return ["lease-churn", f"-endpoint={endpoint}", f"-clients={self.churn_clients}",
                    f"-conns={max(1, self.churn_clients // 4)}", f"-seconds={secs:g}",
                    f"-val-size={self.val_size}"]
        raise ValueError(op)


@dataclass
class Run:
    op: str
    units: float  # events delivered, or loops done
    rate: float  # units per second
    p50_ms: float  # math.inf: the percentile falls among events never delivered
    p99_ms: float
    server_cpu: float
    client_cpu: float
    other_cores: float
    detail: dict = field(default_factory=dict)

    @property
    def server_us_per_unit(self) -> float:
        return self.server_cpu / self.units * 1e6 if self.units else math.inf

    @property
    def client_us_per_unit(self) -> float:
        return self.client_cpu / self.units * 1e6 if self.units else math.inf


def _ms(us: float) -> float:
    return math.inf if us < 0 else us / 1e3


def run_loadgen(tool: Path, server: Server, op: str, settings: Settings, short: bool = False) -> Run:
    cmd = [str(tool), *settings.loadgen_args(op, server.endpoint, short)]
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    srv0, cli0 = server.cpu_seconds(), children_cpu_seconds()
    timeout = settings.seconds + settings.drain + 120
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    srv1, cli1 = server.cpu_seconds(), children_cpu_seconds()
    busy1, t1 = machine_busy_seconds(), time.monotonic()
    if out.returncode != 0:
        raise RuntimeError(f"loadgen exited {out.returncode}: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    d = json.loads(out.stdout)
    srv, cli = srv1 - srv0, cli1 - cli0
    other = max(0.0, (busy1 - busy0) - srv - cli) / max(t1 - t0, 1e-9)
    if op.startswith("fanout"):
        lat = d["ack_to_event_latency"]
        return Run(op, d["events"], d["events_per_sec"], _ms(lat["p50_us"]), _ms(lat["p99_us"]),
                   srv, cli, other, d)
    lat = d["loop_latency"]
    return Run(op, d["loops"], d["loops_per_sec"], _ms(lat["p50_us"]), _ms(lat["p99_us"]), srv, cli, other, d)


def describe(r: Run) -> str:
    d = r.detail
    if r.op.startswith("fanout"):
        return (f"{r.rate:10,.0f} events/s  delivered {d['events'] / max(d['events_expected'], 1):6.1%}  "
                f"puts {d['put_rate']:6.0f}/s  ack→event p50 {r.p50_ms:8.1f} ms p99 {r.p99_ms:8.1f} ms  "
                f"order errors {d['order_errors']}"
                + (f"  ERRORS {d['errors'][:2]}" if d["errors"] else ""))
    return (f"{r.rate:10,.0f} loops/s  p50 {r.p50_ms:6.2f} ms p99 {r.p99_ms:6.2f} ms"
            + (f"  ERRORS {d['error_count']}: {d['errors'][:2]}" if d["error_count"] else ""))


def compare_servers(servers: Sequence[Server], ops: Sequence[str], settings: Settings, repeat: int,
                    tool: Path, warmup: bool) -> dict[str, dict[str, list[Run]]]:
    results: dict[str, dict[str, list[Run]]] = {op: {s.name: [] for s in servers} for op in ops}
    PROGRESS.expect(len(ops) * len(servers) * (repeat + (1 if warmup else 0)))
    for op in ops:
        if warmup:
            for s in servers:
                if s.alive():
                    try:
                        run_loadgen(tool, s, op, settings, short=True)
                        PROGRESS.step(f"  {op:12s} {s.name:9s} warm-up")
                    except Exception as exc:
                        PROGRESS.step(f"  {op:12s} {s.name:9s} warm-up failed: {exc}")
                else:
                    PROGRESS.expect(-1)
        for i in range(repeat):
            # Alternate who goes first so neither side always runs right after the other's load.
            for s in servers if i % 2 == 0 else list(reversed(servers)):
                if not s.alive():
                    PROGRESS.step(f"  {op:12s} {s.name:9s} not running")
                    continue
                try:
                    r = run_loadgen(tool, s, op, settings)
                except Exception as exc:
                    PROGRESS.step(f"  {op:12s} {s.name:9s} FAILED: {exc}")
                    continue
                results[op][s.name].append(r)
                PROGRESS.step(f"  {op:12s} {s.name:9s} run {i + 1}/{repeat}: {describe(r)}  "
                    f"srv {r.server_us_per_unit:7.2f} µs  cli {r.client_us_per_unit:7.2f} µs  "
                    f"others {r.other_cores:4.2f} cores")
    return results


def _med(runs: list[Run], attr: str) -> float | None:
    vals = [getattr(r, attr) for r in runs]
    return statistics.median(vals) if vals else None


def _num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "never"  # a percentile that fell among undelivered events
    return f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isinf(a) or math.isinf(b) or a == 0:
        return "—"
    return f"{b / a:.2f}"


UNIT = {"fanout": "events", "fanout-max": "events", "lease-churn": "loops"}


def table(results: dict[str, dict[str, list[Run]]], names: Sequence[str],
          settings: Settings) -> tuple[list[str], list[list[str]]]:
    base, other = names[0], names[-1]
    two = len(names) > 1
    head = ["workload", "unit"] + [f"{n} /s" for n in names] + ([f"{other}/{base}"] if two else [])
    head += [f"{n} p50/p99 ms" for n in names] + ([f"p99 {other}/{base}"] if two else [])
    head += [f"{n} server µs/unit" for n in names] + [f"{n} client µs/unit" for n in names]
    head += [f"{n} notes" for n in names]
    watchers = settings.streams * settings.watch_per_stream
    label = {
        "fanout": f"{watchers:,} watchers, 1 prefix, {settings.put_rate:g} puts/s",
        "fanout-max": f"{watchers:,} watchers, 1 prefix, puts unlimited",
        "lease-churn": f"lease grant+put+revoke, {settings.churn_clients} clients",
    }
    rows = []
    for op, cells in results.items():
        row = [label[op], UNIT[op]]
        row += [_num(_med(cells[n], "rate")) for n in names]
        if two:
            row.append(_ratio(_med(cells[base], "rate"), _med(cells[other], "rate")))
        row += [f"{_num(_med(cells[n], 'p50_ms'), 1)} / {_num(_med(cells[n], 'p99_ms'), 1)}" for n in names]
        if two:
            row.append(_ratio(_med(cells[base], "p99_ms"), _med(cells[other], "p99_ms")))
        row += [_num(_med(cells[n], "server_us_per_unit"), 2) for n in names]
        row += [_num(_med(cells[n], "client_us_per_unit"), 2) for n in names]
        for n in names:
            runs = cells[n]
            if not runs:
                row.append("failed")
            elif op.startswith("fanout"):
                delivered = statistics.median(r.detail["events"] / max(r.detail["events_expected"], 1)
                                              for r in runs)
                puts = statistics.median(r.detail["put_rate"] for r in runs)
                bad = sum(r.detail["order_errors"] for r in runs)
                row.append(f"{delivered:.1%} delivered, puts {puts:,.0f}/s"
                           + (f", {bad} order errors" if bad else ""))
            else:
                errs = sum(r.detail["error_count"] for r in runs)
                row.append(f"{statistics.median(r.detail['rpcs_per_sec'] for r in runs):,.0f} RPC/s"
                           + (f", {errs} errors" if errs else ""))
        rows.append(row)
    return head, rows


def print_text(head: list[str], rows: list[list[str]]) -> None:
    for r in rows:
        print()
        for h, c in zip(head, r, strict=True):
            print(f"  {h:28s} {c}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma list from {','.join(WORKLOADS)}")
    p.add_argument("--repeat", type=int, default=3, help="runs per workload and server; median reported")
    p.add_argument("--seconds", type=float, default=5.0, help="put phase / churn length of one run")
    p.add_argument("--put-rate", type=float, default=1000.0, help="fanout: puts per second (open loop)")
    p.add_argument("--streams", type=int, default=10, help="fanout: watch streams")
    p.add_argument("--watch-per-stream", type=int, default=100, help="fanout: watches per stream")
    p.add_argument("--conns", type=int, default=10, help="fanout: gRPC connections for the streams")
    p.add_argument("--drain", type=float, default=15.0,
                   help="fanout: seconds to wait after the last put for the remaining events")
    p.add_argument("--max-puts", type=int, default=3000, help="fanout-max: puts per run")
    p.add_argument("--churn-clients", type=int, default=16, help="lease-churn: concurrent clients")
    return parse_bench_args(p, argv, quick_help="smoke run: 1 repeat, 2 s, 5 s drain, no warm-up",
                            quick={"repeat": 1, "seconds": 2.0, "drain": 5.0})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ops = [o.strip() for o in args.only.split(",") if o.strip()]
    if bad := [o for o in ops if o not in WORKLOADS]:
        sys.exit(f"unknown workload(s) {bad}; choose from {WORKLOADS}")
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    settings = Settings(args.seconds, args.put_rate, args.streams, args.watch_per_stream, args.conns,
                        args.drain, args.max_puts, args.churn_clients)
    tool = ensure_loadgen()

    started = time.monotonic()
    PROGRESS.start()
    notes = machine_notes()
    go = subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True).stdout.strip() or "go ?"
    notes["load generator"] = (f"bench/loadgen (Go: grpc-go 1.59; watch responses read raw, puts and leases "
                              f"through etcd api/v3 v3.5.21 protos), {go}")
    with tempfile.TemporaryDirectory(prefix="fastetcd-watchbench-") as tmp:
        servers = make_servers(names, Path(tmp), "", args.python, args.fastetcd_arg)
        with running(servers) as start_errors:
            results = compare_servers(servers, ops, settings, args.repeat, tool, warmup=not args.quick)
    elapsed = time.monotonic() - started
    notes["wall time of this comparison"] = f"{elapsed:.0f} s"
    note_other_cpu(notes, [r.other_cores for cells in results.values() for runs in cells.values()
                           for r in runs])
    notes["settings"] = (
        f"fanout: {args.streams} streams × {args.watch_per_stream} watches on one prefix over {args.conns} "
        f"connections, {args.put_rate:g} puts/s for {args.seconds:g} s (8 putters, open loop), "
        f"256-byte values, {args.drain:g} s drain; latency = put ack → event receipt, "
        "undelivered events count as never; "
        f"lease churn: {args.churn_clients} clients × (grant TTL 60 + put 256 B with the lease + revoke) for "
        f"{args.seconds:g} s; median of {args.repeat}, servers alternate run by run"
    )
    head, rows = table(results, names, settings)
    raw = {
        "kind": "watch",
        "notes": notes,
        "runs": [{**asdict(r), "server": n} for cells in results.values() for n, runs in cells.items()
                 for r in runs],
    }
    plot_failed = write_outputs(raw, args.json, args.plot)
    command = "python bench/watch_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    failed = [f"{op} on {n}" for op, cells in results.items() for n, runs in cells.items() if not runs]
    failed += [f"{n}: {e}" for n, e in start_errors.items()] + plot_failed
    if args.markdown:
        print_markdown(head, rows, notes, command.strip(), [])
    else:
        print_text(head, rows)
        log(f"done in {elapsed:.0f} s")
    for f in failed:
        print(f"not measured: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
