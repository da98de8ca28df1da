#!/usr/bin/env python3
"""Plots of the bench scripts' results: fastetcd against etcd, one PNG per run.

The scripts draw them with `--plot PATH`; this script draws them again from the JSON they save with
`--json PATH`, so a measurement can be re-plotted without being rerun:

    python bench/compare.py --json run.json --plot run.png      # measure, save, plot
    python bench/plot.py run.json                               # again, from the JSON: run.png
    python bench/plot.py compare.json kube.json watch.json -o bench/plots/

The kind of run (compare.py, kube_bench.py, watch_bench.py) is read from the JSON. Every figure uses the
same colour and marker per server (fastetcd orange circles, etcd blue squares, etcd 3.7 light blue
triangles), a legend, and a title with the commit and date of the run. Bars are medians of the repeats,
the dots on them the single runs, so the spread is visible beside the figure the tables report.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = {  # server -> (colour, marker)
    "fastetcd": ("#e8710a", "o"),
    "etcd": ("#1a5fb4", "s"),
    "etcd-3.7": ("#62a0ea", "^"),
}
OTHER_STYLE = ("#777777", "D")


def _style(server: str) -> tuple[str, str]:
    return STYLE.get(server, OTHER_STYLE)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark box
    import matplotlib.pyplot as plt

    return plt


def _median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _title(fig: Any, what: str, notes: dict[str, str]) -> None:
    fig.suptitle(f"{what}\ncommit {notes.get('commit', '?')} — {notes.get('date', '?')}", fontsize=12)


def _servers_in(names: Sequence[str]) -> list[str]:
    """Servers in a stable order: etcd first (the baseline), fastetcd last, as the tables put them."""
    order = {"etcd": 0, "etcd-3.7": 1, "fastetcd": 9}
    return sorted(dict.fromkeys(names), key=lambda n: (order.get(n, 5), n))


def _bars(ax: Any, title: str, unit: str, series: dict[str, list[float]], scale: float = 1.0,
          digits: int = 1) -> None:
    """One bar per server (median of its runs) with every run as a dot on it."""
    names = _servers_in(series)
    for i, name in enumerate(names):
        colour, marker = _style(name)
        runs = [v * scale for v in series[name] if v is not None and math.isfinite(v)]
        med = _median(runs)
        if med is None:
            ax.text(i, 0, "no data", ha="center", va="bottom", fontsize=8)
            continue
        ax.bar(i, med, color=colour, alpha=0.85, label=name, width=0.6)
        ax.scatter([i] * len(runs), runs, color="black", marker=marker, s=14, zorder=3)
        ax.annotate(f"{med:,.{digits}f}", (i, med), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(names)), names)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    ax.grid(axis="y", alpha=0.3)


def _grouped(ax: Any, title: str, unit: str, groups: Sequence[str],
             series: dict[str, list[list[float]]], scale: float = 1.0, log: bool = False) -> None:
    """Bars per group (e.g. p50, p99), one per server side by side; series[server][group] = runs."""
    names = _servers_in(series)
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        colour, marker = _style(name)
        for g in range(len(groups)):
            runs = [v * scale for v in series[name][g] if v is not None and math.isfinite(v)]
            med = _median(runs)
            x = g + (j - (len(names) - 1) / 2) * width
            if med is None:
                # A percentile among events never delivered (watch), or no run at all.
                ax.text(x, 0, "never" if series[name][g] else "—", ha="center", va="bottom", fontsize=7)
                continue
            ax.bar(x, med, width=width * 0.95, color=colour, alpha=0.85, label=name if g == 0 else None)
            ax.scatter([x] * len(runs), runs, color="black", marker=marker, s=10, zorder=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def _legend(fig: Any, axes: Sequence[Any]) -> None:
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    names = _servers_in(handles)
    fig.legend([handles[n] for n in names], names, loc="upper right", fontsize=10)


def _grid(n: int, cols: int) -> tuple[Any, list[Any]]:
    plt = _pyplot()
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows + 0.8), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


# ---------------------------------------------------------------------------------------------------- compare


def plot_compare(data: dict[str, Any], path: Path) -> None:
    """compare.py: per operation, throughput against clients (top) and latency p50 / p99 (bottom)."""
    rows = data["results"]
    ops = list(dict.fromkeys(r["workload"]["op"] for r in rows))
    servers = _servers_in([r["server"] for r in rows])
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(ops), figsize=(4.4 * len(ops), 7.4), squeeze=False)
    for col, op in enumerate(ops):
        top, bottom = axes[0][col], axes[1][col]
        for server in servers:
            colour, marker = _style(server)
            cells = sorted((r for r in rows
                            if r["workload"]["op"] == op and r["server"] == server and r["runs"]),
                           key=lambda r: r["workload"]["clients"])
            if not cells:
                continue
            clients = [c["workload"]["clients"] for c in cells]
            rps = [_median([run["rps"] for run in c["runs"]]) for c in cells]
            top.plot(clients, rps, color=colour, marker=marker, label=server)
            for c in cells:  # every run, faint, behind the median line
                top.scatter([c["workload"]["clients"]] * len(c["runs"]), [run["rps"] for run in c["runs"]],
                            color=colour, alpha=0.35, s=12)
            for pct, style in (("50", "-"), ("99", "--")):
                lat = [_median([run["percentiles"].get(pct, math.nan) * 1e3 for run in c["runs"]])
                       for c in cells]
                bottom.plot(clients, [math.nan if v is None else v for v in lat], color=colour,
                            marker=marker, linestyle=style, label=f"{server} p{pct}")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ticks = sorted({r["workload"]["clients"] for r in rows if r["workload"]["op"] == op})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("clients")
            ax.grid(alpha=0.3)
        top.set_title(f"{op}: throughput", fontsize=10)
        top.set_ylabel("requests/s (median)")
        top.set_ylim(bottom=0)
        bottom.set_title(f"{op}: latency (solid p50, dashed p99)", fontsize=10)
        bottom.set_ylabel("ms")
        bottom.set_ylim(bottom=0)
    _legend(fig, [axes[0][c] for c in range(len(ops))])
    _title(fig, "fastetcd vs etcd 3.5 — etcd's benchmark tool (bench/compare.py)", data.get("notes", {}))
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------- kube


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def plot_kube(data: dict[str, Any], path: Path) -> None:
    """kube_bench.py: T2 list time, T2s stream list, T3 count time, T6 put latency, T7 RSS, T8 restart."""
    panels: list[tuple[str, Any]] = []
    keys, big = _count(data.get("keys", 100_000)), _count(data.get("big_keys", 1_000_000))
    for key, title, unit, scale in (("t2", f"T2 list {keys} × 1 KiB (paginated Range)", "ms", 1e3),
                                    ("t2s", "T2s list as one RangeStream", "ms", 1e3),
                                    ("t3", "T3 count_only over the prefix", "ms per call", 1e3)):  # fmt: skip
        series = {n: [s["value"] for s in samples] for n, samples in data.get(key, {}).items()}
        if series:
            panels.append((key, lambda ax, t=title, u=unit, sc=scale, se=series: _bars(ax, t, u, se, sc, 2)))
    t6 = data.get("t6") or []
    if t6:
        series6 = {r["server"]: [[run["percentiles"].get(p, math.nan) for run in r["runs"]]
                                 for p in ("50", "99")]
                   for r in t6}
        panels.append(("t6", lambda ax: _grouped(ax, "T6 put latency, 1 client", "ms", ["p50", "p99"],
                                                 series6, 1e3)))
    if data.get("t7"):
        series7 = {n: [[s["value"]], [data.get("t7_after_restart", {}).get(n, math.nan)]]
                   for n, s in data["t7"].items()}
        panels.append(("t7", lambda ax: _grouped(ax, f"T7 server RSS, {big} × 256 B", "MiB",
                                                 ["after load", "after restart"], series7, 1 / 2**20)))
    if data.get("t8"):
        series8 = {n: [s["value"]] for n, s in data["t8"].items()}
        panels.append(("t8", lambda ax: _bars(ax, f"T8 restart with {big} keys, until a Range answers", "s",
                                              series8, 1, 2)))
    if not panels:
        raise ValueError("no kube_bench results to plot")
    fig, axes = _grid(len(panels), 3)
    for ax, (_, draw) in zip(axes, panels, strict=True):
        draw(ax)
    _legend(fig, axes)
    _title(fig, "fastetcd vs etcd — kube-shaped targets (bench/kube_bench.py; lower is better)",
           data.get("notes", {}))
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------- watch


WATCH_TITLES = {
    "fanout": ("watch fan-out at a fixed put rate", "events/s"),
    "fanout-max": ("watch fan-out, puts unlimited", "events/s"),
    "lease-churn": ("lease grant + put + revoke", "loops/s"),
}


def plot_watch(data: dict[str, Any], path: Path) -> None:
    """watch_bench.py: per workload, the rate (events or loops per second) and latency p50 / p99."""
    runs = data["runs"]
    ops = list(dict.fromkeys(r["op"] for r in runs))
    fig, axes = _grid(2 * len(ops), 2)
    for i, op in enumerate(ops):
        title, unit = WATCH_TITLES.get(op, (op, "per s"))
        mine = [r for r in runs if r["op"] == op]
        servers = _servers_in([r["server"] for r in mine])
        _bars(axes[2 * i], f"{title}: rate", unit,
              {n: [r["rate"] for r in mine if r["server"] == n] for n in servers}, digits=0)
        lat = "ms, put ack → event" if op.startswith("fanout") else "ms per loop"
        _grouped(axes[2 * i + 1], f"{title}: latency", lat, ["p50", "p99"],
                 {n: [[r[f"{p}_ms"] for r in mine if r["server"] == n] for p in ("p50", "p99")]
                  for n in servers}, log=True)
    _legend(fig, axes)
    _title(fig, "fastetcd vs etcd 3.5 — watch fan-out and lease churn (bench/watch_bench.py)",
           data.get("notes", {}))
    _save(fig, path)


# ----------------------------------------------------------------------------------------------------


PLOTTERS = {"compare": plot_compare, "kube": plot_kube, "watch": plot_watch}


def kind_of(data: dict[str, Any]) -> str:
    if "kind" in data:
        return data["kind"]
    # JSON saved by compare.py before it wrote "kind".
    if isinstance(data.get("results"), list) and data["results"] and "workload" in data["results"][0]:
        return "compare"
    raise ValueError("not a bench JSON file (no 'kind')")


def render(data: dict[str, Any], path: Path) -> Path:
    """Draw ``data`` (what a bench script saves with --json) into the PNG ``path``."""
    PLOTTERS[kind_of(data)](data, Path(path))
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", type=Path, help="files written by a bench script's --json")
    p.add_argument("-o", "--output", type=Path,
                   help="PNG path (one input) or directory (several); default: beside each JSON, .png")
    args = p.parse_args(argv)
    for src in args.json:
        data = json.loads(src.read_text())
        if args.output is None:
            out = src.with_suffix(".png")
        elif len(args.json) > 1 or args.output.is_dir():
            out = args.output / src.with_suffix(".png").name
        else:
            out = args.output
        render(data, out)
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
