"""etcd 3.7.3, the reference for what etcd 3.7 adds (RangeStream), built from the Go module proxy
on first use.

``ci/build_etcd37.sh`` does the build (``.ci/run`` calls it up front); a plain ``pytest tests`` on a fresh
machine gets it here instead, the way the Cosmos test server installs its npm packages on first use.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ETCD37 = REPO / "bench" / ".bin" / "etcd-3.7"
ETCD37_VERSION = "3.7.3"


def etcd37_binary() -> Path:
    """The etcd 3.7.3 server binary, built first if it is missing (needs Go; takes a minute or two)."""
    if not ETCD37.is_file():
        script = REPO / "ci" / "build_etcd37.sh"
        build = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
        assert build.returncode == 0, f"{script} failed:\n{build.stdout[-2000:]}{build.stderr[-2000:]}"
    out = subprocess.run([str(ETCD37), "--version"], capture_output=True, text=True, check=True).stdout
    assert f"etcd Version: {ETCD37_VERSION}" in out, out
    return ETCD37
