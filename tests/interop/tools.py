"""The interoperability tests' client programs, installed or built on first use.

Nothing here needs the network beyond the npm registry (grpc-js, from package-lock.json) and the Go module
proxy (grpc-go and etcd's API packages, from go.sum; etcd's benchmark tool, ci/build_etcd_benchmark.sh).
Parallel test processes take a file lock, so two never install or build into one place at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GRPC_JS_DIR = REPO / "tests" / "interop" / "grpc_js"
GRPC_GO_DIR = REPO / "tests" / "interop" / "grpc_go"
BIN_DIR = REPO / "bench" / ".bin"  # gitignored; bench/compare.py and bench/watch_bench.py build here too
LOADGEN_DIR = REPO / "bench" / "loadgen"
BENCHMARK = BIN_DIR / "benchmark"
INSTALL_TIMEOUT_S = 900.0


@contextmanager
def _locked(name: str) -> Iterator[None]:
    path = Path(tempfile.gettempdir()) / f"fastetcd-{name}-{os.getuid()}.lock"
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    what = f"{' '.join(argv)} in {cwd}"
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def grpc_js_client() -> list[str]:
    """``node scenario.js``, after ``npm ci`` (from the committed package-lock.json) if node_modules is
    missing."""
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"the grpc-js interop client needs Node.js 18+ ({tool} not found on PATH)"
    marker = GRPC_JS_DIR / "node_modules" / "@grpc" / "grpc-js" / "package.json"
    if not marker.exists():
        with _locked("interop-npm-ci"):
            if not marker.exists():
                _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], GRPC_JS_DIR)
    return ["node", str(GRPC_JS_DIR / "scenario.js")]


def _go_build(src: Path, out: Path) -> Path:
    """``go build`` the main package in ``src`` into ``out`` unless ``out`` is newer than every source."""
    sources = [*src.glob("*.go"), src / "go.mod", src / "go.sum"]
    newest = max(p.stat().st_mtime for p in sources)
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    assert shutil.which("go"), "the grpc-go interop clients need Go (go not found on PATH)"
    with _locked(f"go-build-{out.name}"):
        if out.exists() and out.stat().st_mtime >= newest:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        # Never let a newer Go fetch another toolchain; -mod=mod lets a missing go.sum line resolve.
        env = dict(os.environ, GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="-mod=mod")
        tmp = out.with_name(out.name + ".tmp")
        _run(["go", "build", "-trimpath", "-o", str(tmp), "."], src, env)
        tmp.replace(out)
    return out


def grpc_go_client() -> list[str]:
    """The grpc-go scenario client (tests/interop/grpc_go), built on first use."""
    return [str(_go_build(GRPC_GO_DIR, BIN_DIR / "interop-grpc-go"))]


def loadgen() -> Path:
    """bench/loadgen (the project's Go load generator), built as bench/watch_bench.py builds it."""
    return _go_build(LOADGEN_DIR, BIN_DIR / "loadgen")


def etcd_benchmark() -> Path:
    """etcd's tools/benchmark, built by ci/build_etcd_benchmark.sh on first use."""
    if not BENCHMARK.exists():
        with _locked("build-etcd-benchmark"):
            if not BENCHMARK.exists():
                _run(["bash", str(REPO / "ci" / "build_etcd_benchmark.sh")], REPO)
    return BENCHMARK
