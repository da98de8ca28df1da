#!/usr/bin/env python3
"""Kube-shaped comparisons of fastetcd with real etcd 3.5 (TARGETS.md T2, T3, T6, T7, T8).

    T2  100k keys × 1 KiB under /registry/pods/, listed the way kube-apiserver lists: Range over the prefix
        with limit=500 and an exact count, next page from last key + "\\0" at the first page's revision,
        until `more` is false. Time for the whole list.
    T2s the same prefix listed the way kube-apiserver 1.37 lists (EtcdRangeStream): one KV.RangeStream over
        the whole prefix, every chunk read. fastetcd against etcd 3.7.3 (bench/.bin/etcd-3.7, built by
        ci/build_etcd37.sh), the first etcd with RangeStream.
    T3  Range count_only over that prefix: ms per call.
    T6  single-client durable put latency, etcd's `benchmark put --clients 1 --conns 1` (via compare.py).
    T7  server RSS (process tree, /proc) after loading 1M keys × 256 B.
    T8  restart with those 1M keys until a Range is answered (fastetcd; etcd for reference).

Both servers get identical data, loaded with Txn requests of 100 puts each over a few channels. Only one
server is under load at a time; T2/T3 runs alternate between the servers; medians of the repeats.

The list driver is Python grpc with raw-bytes responses (no generated stubs); each page is parsed by upb
against a minimal descriptor that names only the fields the list needs (header.revision, kvs[].key, more,
count), so the rest of every KeyValue stays unparsed. The driver's CPU is reported beside each figure.

    python bench/kube_bench.py                  # T2, T3, T6, T7/T8, 3 repeats (~10 min)
    python bench/kube_bench.py --quick          # smoke run: 10k keys, 100k for T7/T8, 1 repeat
    python bench/kube_bench.py --only t2,t3 --markdown
    python bench/kube_bench.py --only t2s       # RangeStream list: fastetcd vs etcd 3.7
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (  # noqa: E402  (bench/ is not a package; compare.py sits beside this file)
    PROGRESS,
    REPO,
    EtcdServer,
    FastetcdServer,
    Server,
    Workload,
    _field_bytes,
    _varint,
    compare,
    ensure_tool,
    log,
    machine_busy_seconds,
    machine_notes,
    make_servers,
    parse_bench_args,
    results_json,
    running,
    table_rows,
    write_outputs,
)

from fastetcd.testing import prefix_end, tree_memory  # noqa: E402  (compare put src/ on sys.path)

PREFIX = b"/registry/pods/"
PAGE = 500
TXN_OPS = 100  # below etcd's default --max-txn-ops of 128
LOAD_CHANNELS = 4
VALUE_POOL = random.Random(20261126).randbytes(1 << 20)  # seeded: both servers get the same bytes
RANGE = "/etcdserverpb.KV/Range"
RANGE_STREAM = "/etcdserverpb.KV/RangeStream"
ETCD37 = REPO / "bench" / ".bin" / "etcd-3.7"
ETCD37_BUILD = REPO / "ci" / "build_etcd37.sh"
T2S_SERVERS = ("etcd-3.7", "fastetcd")
TXN = "/etcdserverpb.KV/Txn"
GRPC_OPTS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


# ----------------------------------------------------------------------------------------------------
# minimal RangeResponse for upb: only the fields the list reads; everything else stays unknown bytes


def _range_response_class() -> type:
    d = descriptor_pb2
    f = d.FileDescriptorProto(name="kube_bench_min.proto", package="kubebench", syntax="proto3")
    hdr = f.message_type.add(name="Header")
    hdr.field.add(name="revision", number=3, type=d.FieldDescriptorProto.TYPE_INT64,
                  label=d.FieldDescriptorProto.LABEL_OPTIONAL)  # fmt: skip
    kv = f.message_type.add(name="KV")
    kv.field.add(name="key", number=1, type=d.FieldDescriptorProto.TYPE_BYTES,
                 label=d.FieldDescriptorProto.LABEL_OPTIONAL)  # fmt: skip
    rr = f.message_type.add(name="RangeResp")
    rr.field.add(name="header", number=1, type=d.FieldDescriptorProto.TYPE_MESSAGE,
                 type_name=".kubebench.Header", label=d.FieldDescriptorProto.LABEL_OPTIONAL)  # fmt: skip
    rr.field.add(name="kvs", number=2, type=d.FieldDescriptorProto.TYPE_MESSAGE,
                 type_name=".kubebench.KV", label=d.FieldDescriptorProto.LABEL_REPEATED)  # fmt: skip
    rr.field.add(name="more", number=3, type=d.FieldDescriptorProto.TYPE_BOOL,
                 label=d.FieldDescriptorProto.LABEL_OPTIONAL)  # fmt: skip
    rr.field.add(name="count", number=4, type=d.FieldDescriptorProto.TYPE_INT64,
                 label=d.FieldDescriptorProto.LABEL_OPTIONAL)  # fmt: skip
    rs = f.message_type.add(name="RangeStreamResp")
    rs.field.add(name="range_response", number=1, type=d.FieldDescriptorProto.TYPE_MESSAGE,
                 type_name=".kubebench.RangeResp", label=d.FieldDescriptorProto.LABEL_OPTIONAL)  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return pool


_POOL = _range_response_class()
RangeResp = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("kubebench.RangeResp"))
RangeStreamResp = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("kubebench.RangeStreamResp"))


def range_request(
    key: bytes, end: bytes, limit: int = 0, revision: int = 0, count_only: bool = False
) -> bytes:
    out = _field_bytes(1, key) + _field_bytes(2, end)
    if limit:
        out += _varint(3 << 3) + _varint(limit)
    if revision:
        out += _varint(4 << 3) + _varint(revision)
    if count_only:
        out += _varint(9 << 3) + b"\x01"
    return out


# ----------------------------------------------------------------------------------------------------
# loading


def pod_key(i: int) -> bytes:
    return PREFIX + b"ns-%03d/pod-%07d" % (i % 100, i)


def value_for(i: int, size: int) -> bytes:
    # Same bytes for both servers without holding 100 MB+ of values: windows of one random pool.
    off = (i * 7919) % (len(VALUE_POOL) - size)
    return VALUE_POOL[off : off + size]


def txn_request(first: int, n: int, size: int) -> bytes:
    ops = []
    for i in range(first, first + n):
        put = _field_bytes(1, pod_key(i)) + _field_bytes(2, value_for(i, size))
        ops.append(_field_bytes(2, _field_bytes(2, put)))  # TxnRequest.success[] = RequestOp{request_put}
    return b"".join(ops)


def load(server: Server, keys: int, size: int) -> float:
    """Put `keys` keys of `size` bytes with Txn batches over LOAD_CHANNELS channels; returns seconds."""
    channels = [grpc.insecure_channel(server.endpoint, options=GRPC_OPTS) for _ in range(LOAD_CHANNELS)]
    calls = [c.unary_unary(TXN, request_serializer=None, response_deserializer=None) for c in channels]
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(LOAD_CHANNELS * 2) as pool:

            def put_batch(j: int, first: int) -> None:
                calls[j % LOAD_CHANNELS](txn_request(first, min(TXN_OPS, keys - first), size), timeout=120)

            futs = [pool.submit(put_batch, j, s) for j, s in enumerate(range(0, keys, TXN_OPS))]
            for fu in futs:
                fu.result()
    finally:
        for c in channels:
            c.close()
    return time.monotonic() - t0


# ----------------------------------------------------------------------------------------------------
# measurements


@dataclass
class Sample:
    value: float  # the figure: seconds for T2/T8, seconds per call for T3, bytes for T7
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    other_cores: float = 0.0
    note: str = ""


def measured(server: Server, fn: Callable[[], str]) -> Sample:
    """Run fn once, with server CPU (/proc), this process's CPU and the rest of the machine's CPU."""
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    s0, c0 = server.cpu_seconds(), time.process_time()
    note = fn()
    t1 = time.monotonic()
    s1, c1, busy1 = server.cpu_seconds(), time.process_time(), machine_busy_seconds()
    srv, cli = s1 - s0, c1 - c0
    return Sample(t1 - t0, srv, cli, max(0.0, (busy1 - busy0) - srv - cli) / max(t1 - t0, 1e-9), note)


def paginated_list(endpoint: str, expect: int) -> Callable[[], str]:
    def run() -> str:
        end = prefix_end(PREFIX)
        with grpc.insecure_channel(endpoint, options=GRPC_OPTS) as ch:
            call = ch.unary_unary(RANGE, request_serializer=None, response_deserializer=None)
            key, rev, seen, pages, first_count = PREFIX, 0, 0, 0, None
            while True:
                resp = RangeResp.FromString(call(range_request(key, end, PAGE, rev), timeout=60))
                pages += 1
                if first_count is None:
                    first_count, rev = resp.count, resp.header.revision
                seen += len(resp.kvs)
                if not resp.more:
                    break
                key = resp.kvs[-1].key + b"\0"
        if seen != expect or first_count != expect:
            raise RuntimeError(f"list saw {seen} keys, first count {first_count}, expected {expect}")
        return f"{pages} pages"

    return run


def stream_list(endpoint: str, expect: int) -> Callable[[], str]:
    """The whole prefix in one RangeStream (kube-apiserver 1.37 with EtcdRangeStream), every chunk read."""

    def run() -> str:
        with grpc.insecure_channel(endpoint, options=GRPC_OPTS) as ch:
            call = ch.unary_stream(RANGE_STREAM, request_serializer=None, response_deserializer=None)
            seen, chunks, last = 0, 0, None
            for raw in call(range_request(PREFIX, prefix_end(PREFIX)), timeout=120):
                last = RangeStreamResp.FromString(raw).range_response
                seen += len(last.kvs)
                chunks += 1
        if last is None or seen != expect or last.count != expect or last.more:
            got = None if last is None else (last.count, last.more)
            raise RuntimeError(f"stream saw {seen} keys, last chunk (count, more) {got}; expected {expect}")
        return f"{chunks} chunks"

    return run


class Etcd37Server(EtcdServer):
    """etcd v3.7.3 (bench/.bin/etcd-3.7), with the same flags as compare.py's etcd."""

    def binary(self) -> str | None:
        return str(ETCD37)


def ensure_etcd37() -> None:
    if not os.access(ETCD37, os.X_OK):
        log(f"{ETCD37} missing; building it with {ETCD37_BUILD}")
        subprocess.run(["bash", str(ETCD37_BUILD)], check=True, stdout=sys.stderr)


def count_calls(endpoint: str, expect: int, calls: int, per_call: list[float]) -> Callable[[], str]:
    def run() -> str:
        req = range_request(PREFIX, prefix_end(PREFIX), count_only=True)
        with grpc.insecure_channel(endpoint, options=GRPC_OPTS) as ch:
            call = ch.unary_unary(RANGE, request_serializer=None, response_deserializer=None)
            call(req, timeout=60)  # connection set-up outside the timed calls
            for _ in range(calls):
                t0 = time.perf_counter()
                resp = RangeResp.FromString(call(req, timeout=60))
                per_call.append(time.perf_counter() - t0)
                if resp.count != expect or resp.kvs:
                    got = f"count {resp.count}, {len(resp.kvs)} kvs"
                    raise RuntimeError(f"count_only gave {got}; want {expect}")
        return ""

    return run


def tree_rss(root: int) -> int:
    return tree_memory(root, "VmRSS")


# ----------------------------------------------------------------------------------------------------
# phases


@dataclass
class Results:
    t2: dict[str, list[Sample]] = field(default_factory=dict)
    t2s: dict[str, list[Sample]] = field(default_factory=dict)
    t3: dict[str, list[Sample]] = field(default_factory=dict)
    t6: tuple[list[str], list[list[str]]] | None = None
    t6_p50: dict[str, float | None] = field(default_factory=dict)
    t6_runs: list[dict[str, object]] = field(default_factory=list)  # compare.py's JSON form, for plots
    t7: dict[str, Sample] = field(default_factory=dict)
    t7_after_restart: dict[str, int] = field(default_factory=dict)
    t8: dict[str, Sample] = field(default_factory=dict)
    loads: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def phase_list(servers: Sequence[Server], args: argparse.Namespace, res: Results, ops: set[str]) -> None:
    live = [s for s in servers if s.alive()]
    for s in live:
        secs = load(s, args.keys, 1024)
        res.loads[f"{s.name} {args.keys:,} × 1 KiB"] = f"{secs:.1f} s"
        PROGRESS.step(f"{s.name}: loaded {args.keys:,} × 1 KiB in {secs:.1f} s")
        if "t2" in ops:  # warm-up list, untimed: first touches of pages/caches belong to neither side
            paginated_list(s.endpoint, args.keys)()
    for i in range(args.repeat):
        for s in live if i % 2 == 0 else list(reversed(live)):
            if "t2" in ops:
                smp = measured(s, paginated_list(s.endpoint, args.keys))
                res.t2.setdefault(s.name, []).append(smp)
                PROGRESS.step(
                    f"  T2 {s.name:9s} run {i + 1}/{args.repeat}: {smp.value * 1e3:8.1f} ms"
                    f"  srv {smp.server_cpu:.2f} s  cli {smp.client_cpu:.2f} s"
                    f"  others {smp.other_cores:.2f} cores  {smp.note}")  # fmt: skip
            if "t3" in ops:
                calls: list[float] = []
                smp = measured(s, count_calls(s.endpoint, args.keys, args.count_calls, calls))
                # Per call, so the table needs no call count; the untimed first call is in the CPU too.
                smp.value = statistics.median(calls)
                smp.server_cpu /= len(calls) + 1
                smp.client_cpu /= len(calls) + 1
                res.t3.setdefault(s.name, []).append(smp)
                PROGRESS.step(
                    f"  T3 {s.name:9s} run {i + 1}/{args.repeat}: {smp.value * 1e3:8.3f} ms/call"
                    f" (median of {len(calls)})  srv {smp.server_cpu * 1e3:.3f} ms/call")  # fmt: skip


def phase_stream(servers: Sequence[Server], args: argparse.Namespace, res: Results) -> None:
    """T2s: the list as one RangeStream, on fresh servers loaded like T2's."""
    live = [s for s in servers if s.alive()]
    for s in live:
        secs = load(s, args.keys, 1024)
        res.loads[f"{s.name} {args.keys:,} × 1 KiB (T2s)"] = f"{secs:.1f} s"
        PROGRESS.step(f"{s.name}: loaded {args.keys:,} × 1 KiB in {secs:.1f} s")
        stream_list(s.endpoint, args.keys)()  # warm-up, untimed
    for i in range(args.repeat):
        for s in live if i % 2 == 0 else list(reversed(live)):
            smp = measured(s, stream_list(s.endpoint, args.keys))
            res.t2s.setdefault(s.name, []).append(smp)
            PROGRESS.step(
                f"  T2s {s.name:9s} run {i + 1}/{args.repeat}: {smp.value * 1e3:8.1f} ms"
                f"  srv {smp.server_cpu:.2f} s  cli {smp.client_cpu:.2f} s"
                f"  others {smp.other_cores:.2f} cores  {smp.note}")  # fmt: skip


def phase_restart(servers: Sequence[Server], args: argparse.Namespace, res: Results) -> None:
    for s in servers:
        if not s.alive():
            continue
        secs = load(s, args.big_keys, 256)
        res.loads[f"{s.name} {args.big_keys:,} × 256 B"] = f"{secs:.1f} s"
        time.sleep(2)  # let background work after the load (group commit tail, GC) settle
        res.t7[s.name] = Sample(float(tree_rss(s.pid)))
        PROGRESS.step(f"  T7 {s.name:9s} RSS {res.t7[s.name].value / 2**20:.0f} MiB after loading"
            f" {args.big_keys:,} keys"
            f" in {secs:.1f} s")  # fmt: skip
        t0 = time.monotonic()
        s.stop()
        stopped = time.monotonic() - t0
        # Server.start() polls a Range every 50 ms, so the restart time is known to about ±0.05 s.
        smp = measured_start(s)
        smp.note = f"stop took {stopped:.1f} s"
        res.t8[s.name] = smp
        check = RangeResp.FromString(
            grpc_range(s.endpoint, range_request(PREFIX, prefix_end(PREFIX), count_only=True))
        )
        if check.count != args.big_keys:
            res.errors.append(f"{s.name} after restart counts {check.count} keys, expected {args.big_keys}")
        res.t7_after_restart[s.name] = tree_rss(s.pid)
        PROGRESS.step(
            f"  T8 {s.name:9s} restart {smp.value:.2f} s (server CPU {smp.server_cpu:.2f} s), count ok,"
            f" RSS after restart {res.t7_after_restart[s.name] / 2**20:.0f} MiB")  # fmt: skip
        s.stop()  # the next server loads and restarts alone


def measured_start(s: Server) -> Sample:
    t0 = time.monotonic()
    s.start(timeout=300)
    return Sample(time.monotonic() - t0, server_cpu=s.cpu_seconds())


def grpc_range(endpoint: str, req: bytes) -> bytes:
    with grpc.insecure_channel(endpoint, options=GRPC_OPTS) as ch:
        return ch.unary_unary(RANGE, request_serializer=None, response_deserializer=None)(req, timeout=60)


# ----------------------------------------------------------------------------------------------------
# reporting


def _med(samples: list[Sample], attr: str) -> float:
    return statistics.median(getattr(x, attr) for x in samples)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.3f}" if a and b else "—"


def tables(res: Results, names: Sequence[str]) -> dict[str, tuple[list[str], list[list[str]]]]:
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    base, other = names[0], names[-1]
    saved = (names, base, other)
    for key, data, unit, scale, per in (("T2", res.t2, "ms (whole list)", 1e3, 1),
                                        ("T2s", res.t2s, "ms (whole list)", 1e3, 1),
                                        ("T3", res.t3, "ms per call", 1e3, 0)):  # fmt: skip
        if not data:
            continue
        if key == "T2s":  # the RangeStream list: against etcd 3.7, whatever --servers says
            names, base, other = T2S_SERVERS, T2S_SERVERS[0], T2S_SERVERS[-1]
        head = [f"{n} {unit}" for n in names] + [f"{other}/{base}"]
        head += [f"{n} server CPU {'s' if per else 'ms/call'}" for n in names]
        head += [f"{n} client CPU {'s' if per else 'ms/call'}" for n in names]
        head += ["others (cores)", "runs"]
        meds = {n: _med(data[n], "value") if n in data else None for n in names}
        row = [f"{meds[n] * scale:,.{1 if per else 3}f}" if meds[n] else "—" for n in names]
        row.append(_ratio(meds[base], meds[other]))
        for attr in ("server_cpu", "client_cpu"):
            for n in names:
                if n not in data:
                    row.append("—")
                elif per:
                    row.append(f"{_med(data[n], attr):.2f}")
                else:
                    row.append(f"{_med(data[n], attr) * 1e3:.3f}")
        allruns = [x.other_cores for n in names for x in data.get(n, [])]
        row.append(f"{statistics.median(allruns):.2f}" if allruns else "—")
        row.append(str(max(len(data.get(n, [])) for n in names)))
        out[key] = (head, [row])
        names, base, other = saved
    if res.t6:
        out["T6"] = res.t6
    if res.t7:
        head = ["server", "RSS MiB after load", "RSS MiB after restart", "restart s (until a Range answers)",
                "server CPU s during restart", "notes"]  # fmt: skip
        rows = []
        for n in names:
            if n not in res.t7:
                continue
            t8 = res.t8.get(n)
            rows.append([n, f"{res.t7[n].value / 2**20:,.0f}",
                         f"{res.t7_after_restart.get(n, 0) / 2**20:,.0f}",
                         f"{t8.value:.2f}" if t8 else "—", f"{t8.server_cpu:.2f}" if t8 else "—",
                         t8.note if t8 else ""])  # fmt: skip
        if len(rows) == 2:
            a, b = res.t7.get(base), res.t7.get(other)
            ta, tb = res.t8.get(base), res.t8.get(other)
            rows.append([f"{other}/{base}", _ratio(a.value if a else None, b.value if b else None),
                         _ratio(res.t7_after_restart.get(base), res.t7_after_restart.get(other)),
                         _ratio(ta.value if ta else None, tb.value if tb else None), "", ""])  # fmt: skip
        out["T7/T8"] = (head, rows)
    return out


def print_table(head: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


# ----------------------------------------------------------------------------------------------------


def planned_steps(ops: set[str], servers: int, repeat: int) -> int:
    """The steps PROGRESS counts: loads, runs, warm-ups, T7 and T8, per server."""
    steps = 0
    if ops & {"t2", "t3"}:
        steps += servers * (1 + repeat * len(ops & {"t2", "t3"}))
    if "t6" in ops:
        steps += servers * (1 + repeat)  # compare.py's warm-up and runs
    if "t2s" in ops:
        steps += len(T2S_SERVERS) * (1 + repeat)
    if "t7" in ops:
        steps += servers * 2
    return steps


def results_json_kube(res: Results, notes: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    """Every sample as plain data (the --json file; bench/plot.py reads it)."""
    return {
        "kind": "kube",
        "notes": notes,
        "keys": args.keys,  # T2/T3/T2s, × 1 KiB
        "big_keys": args.big_keys,  # T7/T8, × 256 B
        "t2": {n: [asdict(x) for x in xs] for n, xs in res.t2.items()},
        "t2s": {n: [asdict(x) for x in xs] for n, xs in res.t2s.items()},
        "t3": {n: [asdict(x) for x in xs] for n, xs in res.t3.items()},
        "t6": res.t6_runs,
        "t7": {n: asdict(x) for n, x in res.t7.items()},
        "t7_after_restart": res.t7_after_restart,
        "t8": {n: asdict(x) for n, x in res.t8.items()},
        "errors": res.errors,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="t2,t3,t6,t7",
                   help="comma list of t2,t2s,t3,t6,t7 (t7 includes T8; t2s: RangeStream vs etcd 3.7)")
    p.add_argument("--keys", type=int, default=100_000, help="keys × 1 KiB for T2/T3 (default 100k)")
    p.add_argument("--big-keys", type=int, default=1_000_000, help="keys × 256 B for T7/T8 (default 1M)")
    p.add_argument("--count-calls", type=int, default=20, help="count_only calls per T3 run")
    p.add_argument("--repeat", type=int, default=3, help="runs per server for T2/T3/T6; median reported")
    p.add_argument("--seconds", type=float, default=5.0, help="length of one T6 run (default 5)")
    return parse_bench_args(p, argv, quick_help="smoke run: 10k / 100k keys, 1 repeat",
                            quick={"keys": 10_000, "big_keys": 100_000, "repeat": 1, "seconds": 1.0,
                                   "count_calls": 5})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ops = {o.strip().lower() for o in args.only.split(",") if o.strip()}
    known = {"t2", "t2s", "t3", "t6", "t7"}
    if ops - known:
        sys.exit(f"unknown target(s) {sorted(ops - known)}")
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    if set(names) - {"etcd", "fastetcd"}:
        sys.exit(f"unknown server(s) in {names}")
    res = Results()
    started = time.monotonic()
    PROGRESS.start()
    PROGRESS.expect(planned_steps(ops, len(names), args.repeat))
    notes = machine_notes()
    bench = ensure_tool() if "t6" in ops else None
    with tempfile.TemporaryDirectory(prefix="fastetcd-kube-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if ops & {"t2", "t3", "t6"}:
            servers = make_servers(names, tmp, "list", args.python, args.fastetcd_arg)
            with running(servers) as start_errors:
                res.errors += [f"{n}: {e}" for n, e in start_errors.items()]
                if ops & {"t2", "t3"}:
                    phase_list(servers, args, res, ops)
                if "t6" in ops and bench is not None:
                    wl = Workload("put", 1, 1)
                    cells = compare([s for s in servers if s.alive()], [wl], args.repeat, args.seconds, bench,
                                    plan=False)
                    res.t6_runs = results_json(cells)
                    head, rows = table_rows(cells, [n for n in names if n in cells[wl]])
                    res.t6 = (head, rows)
                    res.t6_p50 = {n: c.median_pctl("50") for n, c in cells[wl].items()}
                    res.errors += [f"T6 on {n}: {c.error}" for n, c in cells[wl].items() if c.error]
        if "t2s" in ops:
            ensure_etcd37()
            (tmp / "stream-etcd37").mkdir()
            (tmp / "stream-fastetcd").mkdir()
            servers = [Etcd37Server(T2S_SERVERS[0], tmp / "stream-etcd37"),
                       FastetcdServer(T2S_SERVERS[1], tmp / "stream-fastetcd", python=args.python,
                                      extra_args=args.fastetcd_arg)]
            with running(servers) as start_errors:
                res.errors += [f"{n}: {e}" for n, e in start_errors.items()]
                phase_stream(servers, args, res)
        if "t7" in ops:
            servers = make_servers(names, tmp, "big", args.python, args.fastetcd_arg)
            with running(servers) as start_errors:
                res.errors += [f"{n}: {e}" for n, e in start_errors.items()]
                phase_restart(servers, args, res)
    elapsed = time.monotonic() - started

    notes["load generator"] = (
        f"T2/T3/T7/T8: this script (Python grpc {grpc.__version__}, raw-bytes responses parsed by upb"
        " against a minimal descriptor); T6: " + notes["load generator"]
    )
    notes["wall time"] = f"{elapsed:.0f} s"
    notes["settings"] = (
        f"T2/T3: {args.keys:,} keys × 1 KiB under {PREFIX.decode()} (Txn × {TXN_OPS} puts over "
        f"{LOAD_CHANNELS} channels), list = linearizable Range limit={PAGE} with exact count, next page from "
        f"last key + \\0 at the first page's revision; T3 median of {args.count_calls} count_only calls"
        " per run;"
        f" T6 etcd benchmark put --clients 1 --conns 1, 8-byte keys, 256-byte values; median of {args.repeat}"
        f" runs, servers alternate; T7/T8: {args.big_keys:,} keys × 256 B, each server loaded and restarted"
        " alone (SIGTERM, restart polled every 50 ms)"
        "; T2s: the T2 data in fresh servers, listed as one KV.RangeStream over the prefix (every chunk"
        f" read), against {ETCD37.relative_to(REPO)} (default flags)"
    )
    if "t2s" in ops:
        notes["etcd-3.7"] = subprocess.run([str(ETCD37), "--version"], capture_output=True,
                                           text=True).stdout.splitlines()[0]  # fmt: skip
    notes["load times"] = ", ".join(f"{k}: {v}" for k, v in res.loads.items())
    command = ("python bench/kube_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    tbls = tables(res, names)
    if args.markdown:
        print(f"### {notes['date']} — commit {notes['commit']}\n")
        print(f"- command: `{command}`")
        for k, v in notes.items():
            if k not in ("date", "commit"):
                print(f"- {k}: {v}")
    for key, (head, rows) in tbls.items():
        print(f"\n#### {key}\n" if args.markdown else f"\n{key}")
        print_table(head, rows, args.markdown)
        if key == "T6" and len(res.t6_p50) == 2:
            a, b = (res.t6_p50.get(n) for n in names)
            print(f"\nT6 p50 ratio {names[-1]}/{names[0]}: {_ratio(a, b)}")
    res.errors += write_outputs(results_json_kube(res, notes, args), args.json, args.plot)
    if res.errors:
        print("\nNot measured / errors:\n")
        for e in res.errors:
            print(f"- {e}")
    log(f"done in {elapsed:.0f} s")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
