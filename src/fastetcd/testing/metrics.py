"""Read a server's Prometheus /metrics (fastetcd's or etcd's, on ``--listen-metrics-urls``)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

# Open watch streams and watchers: what a cancelled or expired watch must give back.
WATCH_GAUGES = ("etcd_debugging_mvcc_watch_stream_total", "etcd_debugging_mvcc_watcher_total")


def scrape(metrics_url: str, timeout: float = 10.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``metrics_url``/metrics: (name, sorted labels) → value."""
    with urllib.request.urlopen(metrics_url.rstrip("/") + "/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def gauges(metrics_url: str, names: Sequence[str] = WATCH_GAUGES) -> tuple[float, ...]:
    """The values of unlabelled samples ``names`` (KeyError if one is missing)."""
    samples = scrape(metrics_url)
    return tuple(samples[(name, ())] for name in names)


def wait_for_gauges(metrics_url: str, want: Callable[[tuple[float, ...]], bool],
                    names: Sequence[str] = WATCH_GAUGES, timeout: float = 10.0) -> tuple[float, ...]:
    """Poll ``gauges`` until ``want(values)`` holds or ``timeout`` passes; returns the last values seen.

    Servers release a closed stream's resources asynchronously (etcd and fastetcd alike), so a test asks
    for the state it expects and then asserts on what this returns.
    """
    deadline = time.monotonic() + timeout
    while True:
        values = gauges(metrics_url, names)
        if want(values) or time.monotonic() >= deadline:
            return values
        time.sleep(0.05)
