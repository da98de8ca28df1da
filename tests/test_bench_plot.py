"""bench/plot.py draws every bench script's JSON into a PNG (real matplotlib rendering, no servers).

The JSON is built by compare.py's own serializer where it can be (so a change of format there shows here),
and in the shapes kube_bench.py and watch_bench.py write otherwise. The measurements themselves are checked
by running the scripts' --quick modes by hand; here only the plotting path.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import compare  # noqa: E402  (bench/ is not a package)
import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOTES = {"commit": "abc1234", "date": "2026-11-27 12:00 UTC"}


def run_result(rps: float, p50: float, p99: float) -> compare.RunResult:
    return compare.RunResult(total=1000, rps=rps, wall=1.0, avg=p50, percentiles={"50": p50, "99": p99},
                             errors={}, server_cpu=0.1, client_cpu=0.1, other_cores=0.5)


def compare_json() -> dict:
    results = {}
    for op in ("put", "range-s"):
        for clients in (16, 64):
            wl = compare.Workload(op, clients, compare.default_conns(clients))
            results[wl] = {
                "etcd": compare.Cell(runs=[run_result(9000 + i, 0.002, 0.01) for i in range(3)]),
                "fastetcd": compare.Cell(runs=[run_result(12000 + i, 0.001, 0.008) for i in range(3)]),
            }
    results[compare.Workload("txn-put", 16, 4)] = {"etcd": compare.Cell(runs=[run_result(5000, 0.003, 0.02)]),
                                                   "fastetcd": compare.Cell(error="could not start")}
    return {"kind": "compare", "notes": NOTES, "results": compare.results_json(results)}


def sample(value: float) -> dict:
    return {"value": value, "server_cpu": 0.1, "client_cpu": 0.05, "other_cores": 0.3, "note": ""}


def kube_json() -> dict:
    t6 = compare_json()["results"][:2]
    return {
        "kind": "kube", "notes": NOTES, "keys": 10_000, "big_keys": 100_000,
        "t2": {"etcd": [sample(0.4), sample(0.5)], "fastetcd": [sample(0.1), sample(0.12)]},
        "t2s": {"etcd-3.7": [sample(0.3)], "fastetcd": [sample(0.08)]},
        "t3": {"etcd": [sample(0.006)], "fastetcd": [sample(0.001)]},
        "t6": t6,
        "t7": {"etcd": sample(140 * 2**20), "fastetcd": sample(120 * 2**20)},
        "t7_after_restart": {"etcd": 170 * 2**20, "fastetcd": 110 * 2**20},
        "t8": {"etcd": sample(2.5), "fastetcd": sample(0.6)},
        "errors": [],
    }


def watch_json() -> dict:
    def run(op: str, server: str, rate: float, p99: float) -> dict:
        return {"op": op, "server": server, "units": rate * 2, "rate": rate, "p50_ms": 5.0, "p99_ms": p99,
                "server_cpu": 1.0, "client_cpu": 1.0, "other_cores": 0.2, "detail": {}}

    return {"kind": "watch", "notes": NOTES, "runs": [
        run("fanout", "etcd", 190_000, 40.0), run("fanout", "fastetcd", 250_000, math.inf),  # "never"
        run("lease-churn", "etcd", 380, 120.0), run("lease-churn", "fastetcd", 500, 90.0),
    ]}  # fmt: skip


@pytest.mark.parametrize("make", [compare_json, kube_json, watch_json], ids=["compare", "kube", "watch"])
def test_plot_from_saved_json(tmp_path: Path, make) -> None:
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(make()))  # as the scripts' --json writes it (inf as Infinity)
    assert plot.main([str(saved)]) == 0
    png = saved.with_suffix(".png")
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000  # a drawn figure, not an empty canvas


def test_write_outputs_json_and_plot(tmp_path: Path) -> None:
    # What the scripts' --json / --plot do with the same dict: the JSON re-plots to the same kind of figure.
    raw = compare_json()
    assert compare.write_outputs(raw, tmp_path / "r.json", tmp_path / "r.png") == []
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(raw))
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)
    assert plot.kind_of({"results": raw["results"]}) == "compare"  # JSON saved before "kind" existed
