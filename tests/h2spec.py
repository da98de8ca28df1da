"""h2spec (HTTP/2 conformance), built from the Go module proxy on first use, as tests/etcd37.py builds etcd.

``ci/build_h2spec.sh`` does the build; :func:`run_h2spec` runs sections against a server and returns each
case's outcome by its id (``http2/5.1.1/2``: the section, then the case's number within it, as h2spec
numbers them).
"""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H2SPEC = REPO / "bench" / ".bin" / "h2spec"


def h2spec_binary() -> Path:
    """The h2spec binary, built first if it is missing (needs Go; takes a minute or so)."""
    if not H2SPEC.is_file():
        script = REPO / "ci" / "build_h2spec.sh"
        # Go's default install location, for a shell whose PATH does not have it.
        env = {**os.environ, "PATH": os.environ.get("PATH", "") + os.pathsep + "/usr/local/go/bin"}
        build = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900, env=env)
        assert build.returncode == 0, f"{script} failed:\n{build.stdout[-2000:]}{build.stderr[-2000:]}"
    return H2SPEC


def run_h2spec(port: int, sections: list[str], report: Path, timeout: float = 1.0) -> dict[str, str]:
    """Case id -> "passed", "failed" or "skipped" for ``sections`` run against 127.0.0.1:``port``."""
    proc = subprocess.run(
        [str(h2spec_binary()), "-h", "127.0.0.1", "-p", str(port), "-o", str(int(timeout)), "-j", str(report),
         *sections],
        capture_output=True, text=True, timeout=600,
    )
    assert report.is_file(), f"h2spec wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    # The report quotes frames raw: drop the control bytes XML cannot hold.
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", report.read_bytes().decode("utf-8", "replace"))
    results: dict[str, str] = {}
    numbers: Counter[str] = Counter()
    for case in ET.fromstring(text).iter("testcase"):
        section = case.get("package", "")
        numbers[section] += 1
        if case.find("skipped") is not None:
            outcome = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        else:
            outcome = "passed"
        results[f"{section}/{numbers[section]}"] = outcome
    return results
