"""Run the Go checker (tests/linearizability/checker, built into bench/.bin/lincheck on first use by
ci/build_lincheck.sh, which needs Go and the Go module proxy) on a :class:`History`."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .history import History

REPO = Path(__file__).resolve().parents[2]
CHECKER_SRC = REPO / "tests" / "linearizability" / "checker"
LINCHECK = REPO / "bench" / ".bin" / "lincheck"
BUILD_SCRIPT = REPO / "ci" / "build_lincheck.sh"

# Exit codes of the checker.
LINEARIZABLE, NOT_LINEARIZABLE, BAD_INPUT, UNDECIDED = 0, 1, 2, 3

_build_lock = threading.Lock()
_built = False


def lincheck_binary() -> Path:
    """bench/.bin/lincheck, built first if it is missing or older than its sources (a few seconds, plus
    fetching porcupine from the Go module proxy the first time); checked once per test process."""
    global _built
    with _build_lock:
        if not _built:
            build = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=600)
            assert build.returncode == 0, \
                f"{BUILD_SCRIPT} failed:\n{build.stdout[-2000:]}{build.stderr[-2000:]}"
            _built = True
    return LINCHECK


@dataclass
class Verdict:
    returncode: int
    output: str
    """The checker's explanation (stdout and stderr)."""
    report: dict[str, Any]
    """Its -report JSON: result, porcupine's verdict, counts, violations (empty on bad input)."""
    history_path: Path
    html_path: Path | None = None

    @property
    def linearizable(self) -> bool:
        return self.returncode == LINEARIZABLE

    def describe(self) -> str:
        where = f"history: {self.history_path}"
        if self.html_path is not None:
            where += f"; visualization: {self.html_path}"
        return f"lincheck exit {self.returncode}; {where}\n{self.output}"


def check_history(history: History, workdir: Path, name: str = "history", *, html_on_failure: bool = True,
                  timeout_s: float = 120.0) -> Verdict:
    """Write ``history`` to ``workdir/<name>.json`` and check it. When it is not linearizable and
    ``html_on_failure``, porcupine's visualization goes to ``workdir/<name>.html`` (open it in a browser)."""
    binary = lincheck_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.json"
    report_path = workdir / f"{name}.report.json"
    history.dump(path)
    report_path.unlink(missing_ok=True)

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [str(binary), "-timeout", f"{timeout_s}s", "-report", str(report_path), *extra, str(path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 60)

    done = run()
    html: Path | None = None
    if done.returncode == NOT_LINEARIZABLE and html_on_failure:
        html = workdir / f"{name}.html"
        run("-html", str(html))
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return Verdict(done.returncode, done.stdout + done.stderr, report, path, html)
